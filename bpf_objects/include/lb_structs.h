/* Structs and constants shared by the BPF programs and the Python datapath adapter.
 *
 * This file is the contract between C and Python: bpflb.datapath.structs reads it with
 * cffi (so it must stay plain C: #define NAME <integer>, typedef-free structs of __u8..__u64),
 * and tests/bpf/test_layout.py checks every struct against the BTF of the compiled object.
 * Addresses and ports are in network byte order, as on the wire. */
#ifndef BPFLB_LB_STRUCTS_H
#define BPFLB_LB_STRUCTS_H

/* bpfLBMode, stored in lb_config.mode and in every conntrack entry (a flow keeps its mode). */
#define LB_MODE_SNAT 0
#define LB_MODE_DSR 1
#define LB_MODE_HYBRID 2

/* tunnelMode, stored in lb_config.tunnel_mode. */
#define TUNNEL_DISABLED 0
#define TUNNEL_VXLAN 1
#define VXLAN_PORT 8472        /* the overlay's UDP port, as Cilium and flannel use */
#define VXLAN_OVERHEAD 50      /* outer IPv4 + UDP + VXLAN + inner Ethernet */

/* lb_svc_val.flags on the master slot (slot 0) of a frontend. */
#define LB_SVC_F_NODEPORT 1
#define LB_SVC_F_LOADBALANCER 2
#define LB_SVC_F_EXTERNAL_IP 4
#define LB_SVC_F_LOCAL 8
#define LB_SVC_F_NO_ENDPOINTS 16

/* lb_svc_val.algorithm */
#define LB_ALG_RANDOM 0
#define LB_ALG_MAGLEV 1

/* lb_backend.flags */
#define LB_BE_F_LOCAL 1

/* ct_entry.flags */
#define CT_F_SNAT 1
#define CT_F_LOCAL 2
#define CT_F_DSR 4
#define CT_F_CLOSING 8        /* both sides sent FIN (or RST): the flow lives closing_timeout more */
#define CT_F_RESET 16         /* closed by RST: no TIME_WAIT on either side, reusable at once */
#define CT_F_HOST 32          /* a connection of the node itself, moved off a port a SNAT'd flow holds */
#define CT_F_PORTMAP 64       /* to a local backend, the client port remapped to nat_port (flow.h, np_portmap) */

/* Statistic counters (index into the per-CPU lb_stats array). */
#define STAT_PASS_NOT_SERVICE 0
#define STAT_NEW_FLOW 1
#define STAT_FWD_ESTABLISHED 2
#define STAT_REPLY_SNAT 3
#define STAT_REPLY_DNAT 4
#define STAT_DROP_NO_LOCAL_BACKEND 5
#define STAT_REJECT_NO_ENDPOINTS 6
#define STAT_PASS_FRAGMENT 7
#define STAT_PASS_TRUNCATED 8
#define STAT_DROP_NAT_EXHAUSTED 9
#define STAT_PASS_FIB_FAILED 10
#define STAT_DROP_NO_BACKEND 11
#define STAT_DROP_ERROR 12
#define STAT_DROP_DSR_SPOOFED 13
#define STAT_DROP_DSR_NO_STATE 14
#define STAT_ICMP_FRAG_NEEDED 15
#define STAT_DSR_ACCEPTED 16
#define STAT_DSR_OPT_INSERTED 17
#define STAT_TUNNEL_ENCAP 18
#define STAT_XDP_TX 19
#define STAT_XDP_TO_TC 20
/* 21..31: flow state (issue 11; conntrack.h, flow.h, reset.h, ct_icmp.h, hostnat.h) */
#define STAT_RESET_NAT_EXHAUSTED 21   /* a TCP flow found no SNAT port: answered with a RST */
#define STAT_ICMP_NAT_EXHAUSTED 22    /* a UDP flow found no SNAT port: answered with ICMP port unreachable */
#define STAT_CT_INSERT_FAILED 23      /* a conntrack map was full: the new flow was refused (RST / ICMP) */
#define STAT_CT_NO_STATE 24           /* a TCP packet without SYN to a frontend found no live flow */
#define STAT_ICMP_RELATED 25          /* an ICMP error about a tracked flow, translated and delivered */
#define STAT_HOST_NAT 26              /* a node connection moved off a port a live SNAT'd flow holds */
#define STAT_NAT_PORT_SOCKET 27       /* a SNAT port skipped: a socket of the node uses it towards the backend */
#define STAT_NAT_PORT_REUSED 28       /* a SNAT port taken over from a flow that had ended */
#define STAT_DROP_HOST_NAT_EXHAUSTED 29 /* a node connection found neither its port nor another one free */
#define STAT_DSR_STATE_KEPT 30        /* a DSR SYN for a live flow, no other port free: that flow's state kept */
#define STAT_RESET_SUPPRESSED 31      /* a refusal's RST not sent: its sender is no unicast host (icmp.h's rules) */
/* STAT indices 21..31: flow state (issue 11); 32..47: forwarding safety (issue 12); 48..55: in-cluster
 * traffic (issue 13); 56..63: source ranges (issue 16); 64..71: IP fragments (frag.h); 72..79: packets too
 * big for their next hop (nodeport.h, fib.h). */
#define STAT_MAX 80

/* The DSR IPv4 option (Cilium's wire format): type 0x9a = copy bit | number 26, length 8,
 * then the frontend's port and address in network order. */
#define DSR_OPT_TYPE 154
#define DSR_OPT_LEN 8

/* Map sizes; the Python side reads them to size its own bookkeeping. */
#define LB_SERVICES_MAX 65536
#define LB_SVC_SLOTS_MAX 262144
#define LB_BACKENDS_MAX 65536
#ifndef CT_MAX                 /* a build may size conntrack otherwise (make bpf-layout-test) */
#define CT_MAX 262144          /* entries of ct_fwd and of ct_rev (hash maps: full means new flows are refused) */
#endif

/* A frontend slot: slot 0 is the frontend itself, slots 1..count name its backends. */
struct lb_svc_key {
	__u32 addr;
	__u16 port;
	__u16 slot;
	__u8 proto;
	__u8 pad[3];
};

struct lb_svc_val {
	__u32 id;              /* slot 0: service id; slot > 0: backend id */
	__u16 count;           /* slot 0: number of backend slots */
	__u16 flags;           /* slot 0: LB_SVC_F_* */
	__u32 affinity_timeout;/* slot 0: sessionAffinity ClientIP timeout in seconds, 0 = off */
	__u8 algorithm;        /* slot 0: LB_ALG_* */
	__u8 pad[3];
};

struct lb_backend {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 flags;            /* LB_BE_F_* */
};

/* A connection's 5-tuple as it appears on the wire in one direction. */
struct ct_tuple {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Forward entry (key: the client's tuple as received) or reverse entry (key: the reply's
 * tuple as it leaves the backend).  Forward: rewrite the destination to backend_addr:port
 * and, with CT_F_SNAT or CT_F_PORTMAP, the source to nat_addr:nat_port.  Reverse: rewrite the
 * source to the frontend (fe_addr:fe_port) and, with CT_F_SNAT or CT_F_PORTMAP, the destination
 * to the client. */
struct ct_entry {
	__u64 last_seen;       /* bpf_ktime_get_ns() of the last packet, refreshed at most once a second */
	__u32 backend_id;
	__u32 backend_addr;
	__u32 nat_addr;
	__u32 fe_addr;
	__u32 client_addr;
	__u16 backend_port;
	__u16 nat_port;
	__u16 fe_port;
	__u16 client_port;
	__u32 svc_id;
	__u8 flags;            /* CT_F_* */
	__u8 mode;             /* LB_MODE_* the flow started with */
	__u8 state;            /* CT_S_*: what the flow has shown of TCP's life (both entries agree) */
	__u8 pad;
	__u32 syn_ack_seq;     /* host order: the backend's SYN-ACK sequence number (CT_S_SYN_ACK) */
#ifdef BPFLB_LAYOUT_TEST
	__u64 layout_test;     /* only in the upgrade tests' build (make bpf-layout-test): a field added */
#endif
};

/* An address:port/protocol (DSR frontends known cluster-wide, this node's backend endpoints). */
struct lb_l4_key {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

/* An IPv4 prefix in an LPM trie (the cluster's node addresses and pod CIDRs). */
struct lb_cidr_key {
	__u32 prefixlen;
	__u32 addr;
};

/* Where a cluster address lives: the underlay address of the node that holds it (LPM value). */
struct lb_tunnel_ep {
	__u32 node_addr;
};

/* Runtime settings of a node's datapath (a one-entry array): changed live by the agent. */
struct lb_config {
	__u32 mode;            /* LB_MODE_* for new flows */
	__u32 snat_addr;       /* this node's address, the source of SNAT'd requests */
	__u16 nat_port_min;    /* host order: SNAT source ports are allocated in [min, max] */
	__u16 nat_port_max;
	__u32 ext_ifindex;     /* the external device the programs are attached to */
	__u32 tcp_timeout;     /* seconds an established TCP flow lives without packets */
	__u32 udp_timeout;     /* seconds a UDP flow lives without packets */
	__u32 closing_timeout; /* seconds after FIN/RST */
	__u32 tunnel_mode;     /* TUNNEL_* : how requests reach a backend on another node */
	__u32 tunnel_vni;      /* VXLAN network identifier of the overlay */
	__u32 syn_timeout;     /* seconds a TCP flow whose handshake did not complete holds its state and port */
};

/* ---- Backend selection: Maglev tables and session affinity (issue 8; lb.h, maglev.h, affinity.h) ---- */

/* A frontend's Maglev table is M slot numbers (1..count, 0 = unset), stored in blocks of
 * LB_MAGLEV_BLOCK entries: lb_maglev[{svc_id, i}] holds table entries i*BLOCK .. i*BLOCK+BLOCK-1.
 * M (a prime up to LB_MAGLEV_M_MAX) and the hash seed are cluster-wide, in lb_maglev_cfg. */
#define LB_MAGLEV_BLOCK 8192
#define LB_MAGLEV_BLOCK_SHIFT 13
#define LB_MAGLEV_BLOCKS_MAX 65536
#define LB_MAGLEV_M_MAX 131071
#define LB_AFFINITY_MAX 131072
#define LB_AFFINITY_MEMBERS_MAX 262144

struct lb_maglev_key {
	__u32 svc_id;          /* the frontend's service id (lb_svc_val.id of slot 0) */
	__u32 block;           /* table index >> LB_MAGLEV_BLOCK_SHIFT */
};

struct lb_maglev_block {
	__u16 slot[LB_MAGLEV_BLOCK];   /* host order: the frontend slot a table entry names */
};

/* Cluster-wide Maglev parameters (a one-entry array). */
struct lb_maglev_config {
	__u32 table_size;      /* M; 0 = no table (every frontend selects at random) */
	__u32 hash_seed;       /* initval of the packet hash: equal on every node */
};

/* sessionAffinity ClientIP: the backend a client's new flows to a frontend keep using. */
struct lb_affinity_key {
	__u32 svc_id;
	__u32 client_addr;     /* network order */
};

struct lb_affinity_val {
	__u64 last_used;       /* bpf_ktime_get_ns() of the client's last new flow */
	__u32 backend_id;
	__u32 pad;
};

/* A backend a frontend with session affinity may still give new flows to (present = eligible). */
struct lb_affinity_member {
	__u32 svc_id;
	__u32 backend_id;
};

/* ---- end of backend selection ---- */

/* ---- socket LB (issue 13): in-cluster traffic at the socket (sock.h) and at the pods' veths (pod.h) ---- */

/* lb_svc_val.flags: the master slot of a ClusterIP frontend.  Only in-cluster paths serve it; the
 * external device's tc and XDP programs pass packets addressed to it like any non-service packet. */
#define LB_SVC_F_CLUSTER_IP 32

/* Counters of the in-cluster paths (lb_stats indices 48..55). */
#define STAT_SOCK_CONNECT 48          /* connect() (TCP, connected UDP) sent straight to a backend */
#define STAT_SOCK_SENDMSG 49          /* unconnected UDP datagram sent straight to a backend */
#define STAT_SOCK_REVERSE 50          /* a translated socket's peer shown as the Service (recvmsg, getpeername) */
#define STAT_SOCK_REJECT 51           /* connect()/sendmsg() refused: no endpoint, or none here (iTP Local) */
#define STAT_SOCK_REVNAT_FAILED 52    /* the reverse entry of a translated socket could not be written */
#define STAT_POD_NEW_FLOW 53          /* pod-facing tc: a pod's packet to a Service started a flow (DNAT) */
#define STAT_POD_REPLY 54             /* pod-facing tc: a backend's reply to a pod shown from the Service */
#define STAT_POD_SPOOFED 55           /* pod-facing tc: a pod's packet to a Service from outside this node's pod CIDRs, dropped */

#define LB_SOCK_REV_MAX 262144        /* reverse entries of translated sockets (LRU: oldest sockets first) */
#define LB_SOCK_AFFINITY_MAX 131072   /* affinity entries of socket clients (LRU) */
#define LB_POD_CIDRS_MAX 64           /* this node's pod CIDRs: the sources the pod-facing path serves */

/* The source a pod's hairpin flow (the pod is its own backend) gets on the pod-facing path, so that
 * the pod's reply goes back through its veth; link-local, as Cilium's IPV4_LOOPBACK.  Host order. */
#define LB_HAIRPIN_ADDR 0xA9FE2A01

/* The reverse entry of a socket the socket LB sent to a backend: which Service address its peer is
 * shown as (recvmsg4 for UDP replies, getpeername4).  Key: the socket and its backend. */
struct lb_sock_rev_key {
	__u64 cookie;          /* bpf_get_socket_cookie(): unique per socket for the kernel's lifetime */
	__u32 addr;            /* the backend */
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct lb_sock_rev_val {
	__u32 addr;            /* the frontend the application addressed */
	__u16 port;
	__u16 pad;
};

/* sessionAffinity ClientIP at the socket: the client is its network namespace (the source address is
 * not chosen yet at connect()); a pod is one namespace, so this is ClientIP for pods. */
struct lb_sock_affinity_key {
	__u64 netns_cookie;
	__u32 svc_id;
	__u32 pad;
};

/* ---- end of socket LB ---- */

/* ---- forwarding safety (issue 12; dsr.h, direct.h, icmp.h, neigh.h, fib.h) ---- */

/* drop_ttl_exceeded: not forwarded, it would have left with TTL 0 (answered with time exceeded).
 * icmp_sent: ICMP errors the datapath generated (unreachable, fragmentation needed, time exceeded).
 * icmp_rate_limited: errors not sent because the node's budget (lb_icmp_rl) was spent.
 * icmp_suppressed: errors never sent: to a broadcast, multicast, zero, loopback or own address, to an
 *   unroutable sender, for a frame not addressed to this host, or about a RST.
 * direct_flow: TCP flows of a backend pod the load balancer did not make (reached at the pod's own
 *   address, or opened by the pod), whose replies may leave untranslated.
 * xdp_neigh_check: flow starts XDP handed to tc so the kernel keeps verifying a next hop (neigh.h).
 * ct_port_remapped: new flows to a local backend whose client port was remapped, the pod's view of the
 *   client's tuple being held by another flow (another frontend's, possibly in the pod's TIME_WAIT).
 * pass_other_host: frames tc ingress received addressed to another host's MAC (PACKET_OTHERHOST: a
 *   promiscuous or bridged device on a flooding L2), passed untouched for the kernel to drop.
 * pass_l2_group: IPv4 frames tc ingress received addressed to a broadcast or multicast MAC
 *   (PACKET_BROADCAST, PACKET_MULTICAST; mDNS and the like count too), passed untouched: the kernel never
 *   forwards them nor lets TCP take them, and every node of the segment receives them (balanced, one frame
 *   would become a connection per node). */
#define STAT_DROP_TTL_EXCEEDED 32
#define STAT_ICMP_SENT 33
#define STAT_ICMP_RATE_LIMITED 34
#define STAT_ICMP_SUPPRESSED 35
#define STAT_DIRECT_FLOW 36
#define STAT_XDP_NEIGH_CHECK 37
#define STAT_CT_PORT_REMAPPED 38
#define STAT_PASS_OTHER_HOST 39
#define STAT_PASS_L2_GROUP 40

/* lb_dsr_frontends values: how the backends of a frontend a DSR option may name are listed in
 * lb_dsr_backends. */
#define LB_DSR_FE_NODEPORT 1   /* a NodePort on a node's address: listed under address 0 (any node) */
#define LB_DSR_FE_ADDR 2       /* a LoadBalancer IP or external IP: listed under that address */

#define LB_DSR_BACKENDS_MAX 65536
#define LB_DIRECT_MAX 65536
#define LB_NEIGH_MAX 4096

/* A backend of this node that DSR requests for a frontend may be delivered to (lb_dsr_backends key):
 * the frontend's address (0 for a NodePort), port and protocol, and the backend's address and target port. */
struct lb_dsr_member {
	__u32 fe_addr;
	__u32 be_addr;
	__u16 fe_port;
	__u16 be_port;
	__u8 proto;
	__u8 pad[3];
};

/* A TCP flow of a local backend pod that the load balancer did not make (lb_direct value). */
struct lb_direct_flow {
	__u64 last_seen;       /* bpf_ktime_get_ns() of its last packet, refreshed at most once a second */
	__u32 closing;         /* 1 once a FIN or RST left: the entry lives closing_timeout more */
	__u32 pad;
};

/* The node's ICMP error budget (a one-entry array, like the kernel's icmp_msgs_per_sec/_burst): the agent
 * writes rate and burst (tat 0: the bucket starts full); the datapath keeps the bucket in tat (icmp.h),
 * shared by every CPU and by tc and XDP. */
struct lb_icmp_rl {
	__u32 rate;            /* ICMP errors per second, on average (0: the kernel's default, 1000) */
	__u32 burst;           /* at most this many at once (0: the kernel's default, 50) */
	__u64 tat;             /* bpf_ktime_get_ns() at which the bucket is full again (GCRA) */
};

/* A next hop XDP forwards to (lb_neigh_seen key): the device and the neighbour's IPv4 address. */
struct lb_neigh_key {
	__u32 ifindex;
	__u32 addr;
};

/* ---- end of forwarding safety ---- */

/* ---- flow state (issue 11; conntrack.h, flow.h, hostnat.h, reset.h, ct_icmp.h) ---- */

/* ct_entry.state: monotonic facts about a TCP flow, merged into both of its entries. */
#define CT_S_ESTABLISHED 1     /* the handshake completed (conntrack.h's ct_establishes says when) */
#define CT_S_FIN_FWD 2         /* the client (the connection's opener) sent FIN */
#define CT_S_FIN_REV 4         /* the backend sent FIN */
#define CT_S_SYN_ACK 8         /* the backend answered the SYN (syn_ack_seq holds its sequence number) */

/* The SNAT port range when the agent is given none: Cilium's NodePort SNAT range, so at least 28,000
 * flows per (node, backend address, backend port, protocol). */
#define NAT_PORT_MIN_DEFAULT 32768
#define NAT_PORT_MAX_DEFAULT 65535

/* ---- end of flow state ---- */

/* ---- source ranges (issue 16; srcrange.h): loadBalancerSourceRanges with svcSourceRangeCheck ---- */

/* lb_svc_val.flags on a frontend's master slot: the client's address must be in the frontend's prefixes
 * in lb_src_ranges (LB_SVC_F_SRC_RANGE), or must not be (with LB_SVC_F_SRC_RANGE_DENY as well). */
#define LB_SVC_F_SRC_RANGE 64
#define LB_SVC_F_SRC_RANGE_DENY 128

/* Counters of the source range check (lb_stats indices 56..63). */
#define STAT_DROP_SRC_RANGE 56        /* a packet to a frontend from a client its source ranges refuse */
#define STAT_XDP_DROP_SRC_RANGE 57    /* of those, dropped at XDP (never reaching tc) */

#define LB_SRC_RANGES_MAX 65536       /* prefixes of all frontends together (lb_src_ranges entries) */

/* A frontend's allowed (or denied) client prefix: an LPM key whose prefixlen counts 32 bits of svc_id and
 * then the prefix's own length, so a lookup with prefixlen 64 matches only that frontend's prefixes. */
struct lb_src_range_key {
	__u32 prefixlen;
	__u32 svc_id;          /* the frontend's service id (lb_svc_val.id of its master slot) */
	__u32 addr;            /* network order */
};

/* ---- end of source ranges ---- */

/* ---- IP fragments (frag.h): a fragmented datagram of a flow is translated whole ---- */

/* Counters (lb_stats indices 64..71).  frag_tracked: first fragments translated, their ports recorded for
 * the rest of the datagram; frag_followed: later fragments that found their first fragment's record and
 * went the way of its flow; frag_track_failed: first fragments translated whose ports could not be
 * recorded (the rest of that datagram passes untouched).  A later fragment with no record counts as
 * pass_fragment (ingress). */
#define STAT_FRAG_TRACKED 64
#define STAT_FRAG_FOLLOWED 65
#define STAT_FRAG_TRACK_FAILED 66

#define LB_FRAG_MAX 8192              /* datagrams in flight whose first fragment was translated (LRU) */
#define LB_FRAG_LIFETIME_S 2          /* a record older than this is not used (the IP id may come round again) */

/* A fragmented datagram as its fragments arrive (before translation): RFC 791's reassembly key. */
struct lb_frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id;              /* the IPv4 identification field, network order */
	__u8 proto;
	__u8 pad;
};

/* The L4 ports its first fragment carried, so later fragments find the first one's flow. */
struct lb_frag_val {
	__u64 created;         /* bpf_ktime_get_ns() when the first fragment was translated */
	__u16 sport;
	__u16 dport;
	__u32 pad;
};

/* ---- end of IP fragments ---- */

/* ---- packets too big for their next hop (nodeport.h, fib.h) ---- */

/* Counters (lb_stats indices 72..79).  fwd_fragmented: forwarded packets without DF that bpflb's growth (the
 * DSR option, the overlay) or a smaller MTU towards the backend made too big for the path, translated and
 * handed to the kernel to fragment, as a router does (its forwarding, or its VXLAN device); with DF they are
 * answered with fragmentation needed (icmp_frag_needed) instead.  pass_too_big: packets the backend's node
 * delivers to a pod (a DSR request), or ICMP errors forwarded about a flow, that are too big for the route
 * there, handed to the kernel's forwarding, which fragments them or, with DF, answers fragmentation needed. */
#define STAT_FWD_FRAGMENTED 72
#define STAT_PASS_TOO_BIG 73

/* ---- end of packets too big ---- */

#endif
