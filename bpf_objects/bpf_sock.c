/* bpflb's socket load balancer (sock.h): four cgroup v2 programs, attached to the cgroup that holds a
 * node's pods and the node's own processes (the agent's cgroup root), sharing the frontends, backends,
 * Maglev tables and affinity members of bpf_lb.o through their pins.
 * lb_connect4      cgroup/connect4: a connect() (TCP, UDP) to a frontend goes to a backend.
 * lb_sendmsg4      cgroup/sendmsg4: an unconnected UDP datagram to a frontend goes to a backend.
 * lb_recvmsg4      cgroup/recvmsg4: a UDP reply from that backend shows the frontend as its source.
 * lb_getpeername4  cgroup/getpeername4: a translated socket's peer shows as the frontend. */
#include "include/sock.h"

SEC("cgroup/connect4")
int lb_connect4(struct bpf_sock_addr *ctx)
{
	return sock_xlate_fwd(ctx, STAT_SOCK_CONNECT);
}

SEC("cgroup/sendmsg4")
int lb_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock_xlate_fwd(ctx, STAT_SOCK_SENDMSG);
}

SEC("cgroup/recvmsg4")
int lb_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock_xlate_rev(ctx);
}

SEC("cgroup/getpeername4")
int lb_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock_xlate_rev(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
