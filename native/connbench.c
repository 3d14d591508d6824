/* The connection-setup benchmark's client and server (`bpflb bench --clusterip`,
 * operator/bpflb/bench_clusterip.py), in C so that what is counted is the kernel's cost of a
 * connection, not an interpreter's.  Built by `make` into bpf_objects/build/connbench.
 *
 *   connbench serve PORT                   accept on 0.0.0.0:PORT and close each connection at once,
 *                                          until killed; prints "ready" once listening.
 *   connbench connect SECONDS IP:PORT...   connect to the addresses in turn for SECONDS, closing each
 *                                          connection with a reset (no TIME_WAIT to run out of ports);
 *                                          prints "CONNECTS SECONDS ERRORS FIRST_ERRNO". */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static int serve(int port)
{
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 4096) < 0) {
		perror("connbench serve");
		return 1;
	}
	printf("ready\n");
	fflush(stdout);
	for (;;) {
		int c = accept(fd, NULL, NULL);

		if (c >= 0)
			close(c);
		else if (errno != ECONNABORTED && errno != EINTR)
			return 1;
	}
}

static int parse(const char *text, struct sockaddr_in *out)
{
	char host[64];
	const char *colon = strrchr(text, ':');

	if (!colon || colon - text >= (long)sizeof(host))
		return -1;
	memcpy(host, text, colon - text);
	host[colon - text] = 0;
	memset(out, 0, sizeof(*out));
	out->sin_family = AF_INET;
	out->sin_port = htons(atoi(colon + 1));
	return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

static int connect_loop(double seconds, int n, char **targets)
{
	struct sockaddr_in *addrs = calloc(n, sizeof(*addrs));
	struct linger reset = { .l_onoff = 1, .l_linger = 0 };
	long connects = 0, errors = 0;
	int first_errno = 0, i = 0;
	double start, t;

	if (!addrs)
		return 1;
	for (int k = 0; k < n; k++)
		if (parse(targets[k], &addrs[k]) < 0) {
			fprintf(stderr, "connbench: bad address %s (expected IP:PORT)\n", targets[k]);
			return 2;
		}
	start = now();
	while ((t = now()) - start < seconds) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);

		if (fd < 0)
			return 1;
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
		if (connect(fd, (struct sockaddr *)&addrs[i], sizeof(addrs[i])) == 0) {
			connects++;
		} else {
			if (!errors)
				first_errno = errno;
			errors++;
		}
		close(fd);
		i = (i + 1) % n;
	}
	printf("%ld %.6f %ld %d\n", connects, t - start, errors, first_errno);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 3 && !strcmp(argv[1], "serve"))
		return serve(atoi(argv[2]));
	if (argc >= 4 && !strcmp(argv[1], "connect"))
		return connect_loop(atof(argv[2]), argc - 3, argv + 3);
	fprintf(stderr, "usage: connbench serve PORT | connbench connect SECONDS IP:PORT...\n");
	return 2;
}
