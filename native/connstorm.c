/* The rate benchmark's TCP client (bpflb.trafficgen runs it inside the lab client's namespace; `make`
 * builds it into bpf_objects/build/bpflb-connstorm).  It opens connections to ADDR:PORT for SECONDS,
 * CONCURRENCY attempts in flight per thread: each counts once its handshake completes and is then closed
 * with a RST (SO_LINGER 0: no TIME_WAIT, as load generators do); an attempt unanswered after TIMEOUT_MS
 * counts as failed.  One JSON line on stdout: {"ok": N, "failed": N, "seconds": S, "errors": {...}}.
 * The Python client it replaces spent ~40 us of its own per connection and was the ceiling of every row.
 *
 *     bpflb-connstorm ADDR PORT SECONDS CONCURRENCY TIMEOUT_MS THREADS */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_FD 65536
#define N_ERRORS 4

static const char *error_names[N_ERRORS] = { "timeout", "ECONNREFUSED", "EADDRNOTAVAIL", "other" };

struct storm {
	struct sockaddr_in dst;
	double seconds;
	int concurrency;
	int timeout_ms;
	uint64_t ok;
	uint64_t failed[N_ERRORS];
	double elapsed;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int error_index(int err)
{
	if (err == ETIMEDOUT)
		return 0;
	if (err == ECONNREFUSED)
		return 1;
	if (err == EADDRNOTAVAIL)
		return 2;
	return 3;
}

static void *run(void *arg)
{
	struct storm *st = arg;
	struct linger rst = { .l_onoff = 1, .l_linger = 0 };
	struct epoll_event events[256];
	double *started = calloc(MAX_FD, sizeof(double));
	int ep = epoll_create1(0), inflight = 0;
	double start = now_s(), deadline = start + st->seconds, last_scan = start;

	if (!started || ep < 0) {
		perror("bpflb-connstorm");
		exit(1);
	}
	for (;;) {
		double t = now_s();
		int n, i;

		while (t < deadline && inflight < st->concurrency) {
			int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
			struct epoll_event ev = { .events = EPOLLOUT };

			if (fd < 0 || fd >= MAX_FD) {
				perror("bpflb-connstorm: socket");
				exit(1);
			}
			setsockopt(fd, SOL_SOCKET, SO_LINGER, &rst, sizeof(rst));
			if (connect(fd, (struct sockaddr *)&st->dst, sizeof(st->dst)) < 0 && errno != EINPROGRESS) {
				st->failed[error_index(errno)]++;
				close(fd);
				continue;
			}
			ev.data.fd = fd;
			epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
			started[fd] = t;
			inflight++;
		}
		if (t >= deadline && inflight == 0)
			break;
		if (t > deadline + st->timeout_ms / 1000.0 + 1)
			break;
		n = epoll_wait(ep, events, 256, 10);
		for (i = 0; i < n; i++) {
			int fd = events[i].data.fd, err = 0;
			socklen_t len = sizeof(err);

			getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
			if (err == 0)
				st->ok++;
			else
				st->failed[error_index(err)]++;
			started[fd] = 0;
			close(fd);
			inflight--;
		}
		t = now_s();
		if (t - last_scan > 0.05) {
			int fd;

			last_scan = t;
			for (fd = 0; fd < MAX_FD; fd++) {
				if (started[fd] > 0 && t - started[fd] > st->timeout_ms / 1000.0) {
					st->failed[0]++;
					started[fd] = 0;
					close(fd);
					inflight--;
				}
			}
		}
	}
	st->elapsed = (now_s() < deadline ? now_s() : deadline) - start;
	free(started);
	close(ep);
	return NULL;
}

int main(int argc, char **argv)
{
	struct storm *st;
	pthread_t *tid;
	uint64_t ok = 0, failed[N_ERRORS] = { 0 }, total_failed = 0;
	double seconds = 0;
	int threads, i, k, first = 1;

	if (argc != 7) {
		fprintf(stderr, "usage: %s ADDR PORT SECONDS CONCURRENCY TIMEOUT_MS THREADS\n", argv[0]);
		return 2;
	}
	threads = atoi(argv[6]);
	if (threads < 1 || threads > 64 || atoi(argv[4]) < 1) {
		fprintf(stderr, "%s: THREADS must be 1-64 and CONCURRENCY at least 1\n", argv[0]);
		return 2;
	}
	st = calloc(threads, sizeof(*st));
	tid = calloc(threads, sizeof(*tid));
	for (i = 0; i < threads; i++) {
		st[i].dst.sin_family = AF_INET;
		st[i].dst.sin_port = htons(atoi(argv[2]));
		if (inet_pton(AF_INET, argv[1], &st[i].dst.sin_addr) != 1) {
			fprintf(stderr, "%s: bad address %s\n", argv[0], argv[1]);
			return 2;
		}
		st[i].seconds = atof(argv[3]);
		st[i].concurrency = atoi(argv[4]);
		st[i].timeout_ms = atoi(argv[5]);
		pthread_create(&tid[i], NULL, run, &st[i]);
	}
	for (i = 0; i < threads; i++) {
		pthread_join(tid[i], NULL);
		ok += st[i].ok;
		for (k = 0; k < N_ERRORS; k++)
			failed[k] += st[i].failed[k];
		if (st[i].elapsed > seconds)
			seconds = st[i].elapsed;
	}
	for (k = 0; k < N_ERRORS; k++)
		total_failed += failed[k];
	printf("{\"ok\": %llu, \"failed\": %llu, \"seconds\": %.6f, \"errors\": {", (unsigned long long)ok,
	       (unsigned long long)total_failed, seconds);
	for (k = 0; k < N_ERRORS; k++) {
		if (failed[k]) {
			printf("%s\"%s\": %llu", first ? "" : ", ", error_names[k], (unsigned long long)failed[k]);
			first = 0;
		}
	}
	printf("}}\n");
	return 0;
}
