//! Traffic that a well-behaved two-line probe never sends, through a real agent: megabytes over
//! one TCP connection with and without segmentation offloads and at jumbo MTU, UDP datagrams
//! close to the MTU, spoofed source addresses and injected segments from a hostile workload, a
//! SYN in the reply direction of an earlier flow, and neighbour discovery aimed across the node.
//! Each test builds its own node namespace with workload namespaces (`tg-<workload>` on the node
//! side) and starts `tollgate agent` there with its own socket and pin directory. Where an
//! answer cannot show what happened (a spoofed packet's answer goes to the address it forged),
//! a packet tap in the target namespace says what arrived, and a second tap in the sender's
//! namespace proves the packets were sent. Needs root; fails (never skips) without it.
//!
//! Tests that depend on datapath changes being made in parallel, and fail on the datapath as it
//! was when they were written:
//! - bulk TCP with offloads on (default MTU and 9000): GSO/GRO super-packets are larger than
//!   the linear part of the skb and were dropped as `drop_malformed`;
//! - spoofing (`spoofed_*`, `injected_*`, `an_unclaimed_address_*`): need the strict
//!   reverse-path check, identity-bound interfaces (`interfaces:` on an identity) and the
//!   `drop_spoofed` verdict;
//! - `a_syn_in_the_reply_direction_*`: needs a reply-direction SYN to be a new flow;
//! - `neighbour_discovery_*`: needs ND to pass only on its own link, not routed across.

mod support;

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use support::env::AgentEnv;
use tollgate_testbed::{
    spoof::{self, tcp_flags, NdMessage, TcpSegment},
    traffic::{
        echo_roundtrip, tcp_bulk_echo, tcp_connect, tcp_connect_from, tcp_echo_server,
        tcp_reachable, udp_echo_of_size, udp_echo_server, udp_reachable,
    },
    CapturedPacket, PacketTap, TopologyOptions,
};

/// frontend → orders on TCP 8080 and UDP 9000; anything unclaimed (`world`) → orders on TCP
/// 8081. The intruder has an identity of its own and no rules.
const POLICY: &str = r#"apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata:
  name: traffic
spec:
  identities:
    - name: frontend
      cidrs: ["10.200.1.2/32", "fd00:200:1::2/128"]
    - name: orders
      cidrs: ["10.200.2.2/32", "fd00:200:2::2/128"]
    - name: intruder
      cidrs: ["10.200.3.2/32", "fd00:200:3::2/128"]
  rules:
    - name: frontend-to-orders
      from: frontend
      to: orders
      ports:
        - { port: 8080, protocol: TCP }
        - { port: 9000, protocol: UDP }
    - name: world-to-orders
      from: world
      to: orders
      ports:
        - { port: 8081, protocol: TCP }
"#;

/// `POLICY` with tg-intruder bound to the intruder identity: that interface may only send the
/// intruder's addresses.
fn bound_policy() -> String {
    let intruder = "      cidrs: [\"10.200.3.2/32\", \"fd00:200:3::2/128\"]\n";
    assert!(POLICY.contains(intruder));
    POLICY.replace(
        intruder,
        &format!("{intruder}      interfaces: [\"tg-intruder\"]\n"),
    )
}

/// Subnets follow the order of the workloads: frontend 1, orders 2, intruder 3.
const WORKLOADS: &[&str] = &["frontend", "orders", "intruder"];

const BULK_BYTES: usize = 4 * 1024 * 1024;

const NO_OFFLOADS: TopologyOptions = TopologyOptions {
    mtu: 1500,
    offloads: false,
};

const JUMBO: TopologyOptions = TopologyOptions {
    mtu: 9000,
    offloads: true,
};

/// How long a tap watches for packets that must not arrive. The packets are sent before the
/// window opens and veths deliver in microseconds; a second is plenty.
const TAP_WINDOW: Duration = Duration::from_secs(1);

/// The shared fixture, with this file's helpers.
type Env = AgentEnv;

impl Env {
    fn new(short: &str, options: TopologyOptions, policy: &str) -> Env {
        // "tgtr": namespace names of their own, apart from namespaced.rs's "tg<pid>-" ones.
        AgentEnv::start(
            &format!("tgtr{}-{short}", std::process::id() % 100_000),
            &format!("traffic-{short}"),
            WORKLOADS,
            options,
            policy,
        )
    }

    fn tap(&self, workload: &str) -> PacketTap {
        PacketTap::open(self.ns(workload), "eth0").expect("packet tap")
    }

    /// Asserts `drop_spoofed` is above `before` (read with `verdict`, before the spoofing).
    fn assert_spoofed_counted(&self, before: Option<u64>) {
        let after = self.verdict_count("drop_spoofed");
        assert!(
            after > before.unwrap_or(0),
            "drop_spoofed did not grow ({before:?} -> {after})"
        );
    }

    /// frontend → orders:8080 echoes, and the orders tap saw it arrive: the tap works, so its
    /// silence about spoofed packets means something.
    fn assert_tap_sees_frontend(&self, tap: &PacketTap, v6: bool) {
        let frontend = self.addr("frontend", v6);
        assert!(
            tcp_reachable(self.ns("frontend"), self.addr("orders", v6), 8080),
            "frontend -> orders:8080 must pass"
        );
        let seen = tap
            .wait_for(TAP_WINDOW, |p| {
                p.arrived_from(frontend) && p.dst_port == Some(8080)
            })
            .unwrap();
        assert!(
            seen.is_some(),
            "the orders tap did not see frontend's traffic"
        );
        tap.drain().unwrap();
    }
}

fn serve_tcp(env: &Env, workload: &str, v6: bool, port: u16) {
    tcp_echo_server(env.ns(workload), env.addr(workload, v6), port, 64).expect("tcp server");
}

fn serve_udp(env: &Env, workload: &str, v6: bool, port: u16) {
    udp_echo_server(env.ns(workload), env.addr(workload, v6), port, 64).expect("udp server");
}

/// Packets received on `tap` within `TAP_WINDOW` that match `pred`.
fn arrivals(tap: &PacketTap, pred: impl Fn(&CapturedPacket) -> bool) -> Vec<CapturedPacket> {
    let mut got = tap.collect_for(TAP_WINDOW).unwrap();
    got.retain(|p| !p.outgoing && pred(p));
    got
}

/// Asserts the sender's own tap saw at least one packet matching `pred` leave: the spoofing
/// tool really sent what the target's tap is asserted not to see.
fn assert_sent(sender_tap: &PacketTap, what: &str, pred: impl Fn(&CapturedPacket) -> bool) {
    let mut sent = sender_tap.collect_for(Duration::from_millis(200)).unwrap();
    sent.retain(|p| p.outgoing && pred(p));
    assert!(!sent.is_empty(), "the intruder's tap saw no {what} leave");
}

// ---- Bulk TCP: 4 MiB each way over one connection ----------------------------------------------

/// With offloads on (the default) the sender's stack hands the veth GSO super-packets and the
/// datapath sees skbs much larger than the MTU whose payload is not in the linear part.
fn bulk_tcp_echo(short: &str, v6: bool, options: TopologyOptions) {
    let env = Env::new(short, options, POLICY);
    serve_tcp(&env, "orders", v6, 8080);
    let malformed_before = env.verdict_count("drop_malformed");
    let result = tcp_bulk_echo(env.ns("frontend"), env.addr("orders", v6), 8080, BULK_BYTES);
    let malformed = env.verdict_count("drop_malformed") - malformed_before;
    if let Err(e) = result {
        panic!("{e:#} (drop_malformed grew by {malformed})");
    }
    assert_eq!(malformed, 0, "packets of a healthy transfer were malformed");
}

// Depends on the datapath change (offloads on).
#[test]
fn tcp_bulk_echo_with_offloads_ipv4() {
    bulk_tcp_echo("bulk4", false, TopologyOptions::default());
}

// Depends on the datapath change (offloads on).
#[test]
fn tcp_bulk_echo_with_offloads_ipv6() {
    bulk_tcp_echo("bulk6", true, TopologyOptions::default());
}

#[test]
fn tcp_bulk_echo_without_offloads_ipv4() {
    bulk_tcp_echo("bulkoff4", false, NO_OFFLOADS);
}

#[test]
fn tcp_bulk_echo_without_offloads_ipv6() {
    bulk_tcp_echo("bulkoff6", true, NO_OFFLOADS);
}

// Depends on the datapath change (offloads on).
#[test]
fn tcp_bulk_echo_at_mtu_9000_ipv4() {
    bulk_tcp_echo("jumbo4", false, JUMBO);
}

// Depends on the datapath change (offloads on).
#[test]
fn tcp_bulk_echo_at_mtu_9000_ipv6() {
    bulk_tcp_echo("jumbo6", true, JUMBO);
}

// ---- UDP datagrams close to the MTU ----------------------------------------------------------

/// Sizes stay below the path MTU (IP and UDP headers included): IP fragments are dropped by
/// design (non-first fragments carry no ports), so a datagram that needs fragmenting would not
/// pass, and is not what these tests are about.
fn large_udp_datagram_echoes(short: &str, v6: bool, options: TopologyOptions, size: usize) {
    let env = Env::new(short, options, POLICY);
    serve_udp(&env, "orders", v6, 9000);
    assert!(
        udp_echo_of_size(env.ns("frontend"), env.addr("orders", v6), 9000, size).unwrap(),
        "a {size}-byte datagram did not come back whole (MTU {})",
        options.mtu
    );
}

#[test]
fn udp_1400_byte_datagram_echoes_at_mtu_1500_ipv4() {
    large_udp_datagram_echoes("udp4", false, TopologyOptions::default(), 1400);
}

#[test]
fn udp_1400_byte_datagram_echoes_at_mtu_1500_ipv6() {
    large_udp_datagram_echoes("udp6", true, TopologyOptions::default(), 1400);
}

#[test]
fn udp_8000_byte_datagram_echoes_at_mtu_9000_ipv4() {
    large_udp_datagram_echoes("udpj4", false, JUMBO, 8000);
}

#[test]
fn udp_8000_byte_datagram_echoes_at_mtu_9000_ipv6() {
    large_udp_datagram_echoes("udpj6", true, JUMBO, 8000);
}

// ---- Spoofing from the intruder -----------------------------------------------------------------

/// (a) UDP and a TCP SYN with frontend's source address, sent from the intruder's namespace.
fn spoofed_source_does_not_arrive(short: &str, v6: bool) {
    let env = Env::new(short, TopologyOptions::default(), &bound_policy());
    serve_tcp(&env, "orders", v6, 8080);
    serve_udp(&env, "orders", v6, 9000);
    let orders_tap = env.tap("orders");
    let intruder_tap = env.tap("intruder");
    env.assert_tap_sees_frontend(&orders_tap, v6);
    assert!(
        udp_reachable(env.ns("frontend"), env.addr("orders", v6), 9000).unwrap(),
        "frontend -> orders:9000/udp must pass"
    );
    orders_tap.drain().unwrap();

    let frontend = env.addr("frontend", v6);
    let orders = env.addr("orders", v6);
    let (udp_from, syn_from) = (
        SocketAddr::new(frontend, 40001),
        SocketAddr::new(frontend, 40002),
    );
    let spoofed_before = env.verdict("drop_spoofed");
    for _ in 0..3 {
        spoof::send_udp(
            env.ns("intruder"),
            udp_from,
            SocketAddr::new(orders, 9000),
            b"forged",
        )
        .unwrap();
        spoof::send_tcp(
            env.ns("intruder"),
            &TcpSegment::syn(syn_from, SocketAddr::new(orders, 8080)),
        )
        .unwrap();
    }
    let spoofed_port = |p: &CapturedPacket| matches!(p.src_port, Some(40001 | 40002));
    let arrived = arrivals(&orders_tap, |p| p.src == frontend && spoofed_port(p));
    assert!(
        arrived.is_empty(),
        "spoofed packets reached orders: {arrived:?}"
    );
    assert_sent(&intruder_tap, "spoofed packet", |p| {
        p.src == frontend && spoofed_port(p)
    });
    env.assert_spoofed_counted(spoofed_before);
}

// Depends on the datapath change (anti-spoofing).
#[test]
fn spoofed_udp_and_syn_from_another_workloads_address_do_not_arrive_ipv4() {
    spoofed_source_does_not_arrive("spoof4", false);
}

// Depends on the datapath change (anti-spoofing).
#[test]
fn spoofed_udp_and_syn_from_another_workloads_address_do_not_arrive_ipv6() {
    spoofed_source_does_not_arrive("spoof6", true);
}

/// Is sequence number `a` after `b` (modulo 2^32)?
fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The next sequence number orders expects from the client of `conn`, and the next one orders
/// will send, learned from the orders tap (which must have seen the connection's traffic).
fn next_sequence_numbers(tap: &PacketTap, conn: &TcpStream) -> (u32, u32) {
    let client = conn.local_addr().unwrap();
    let server = conn.peer_addr().unwrap();
    let (mut from_client, mut from_server): (Option<u32>, Option<u32>) = (None, None);
    let advance = |slot: &mut Option<u32>, p: &CapturedPacket| {
        let tcp = p.tcp.unwrap();
        let syn_fin = u32::from(tcp.flags & (tcp_flags::SYN | tcp_flags::FIN) != 0);
        let next = tcp.seq.wrapping_add(p.payload_len as u32 + syn_fin);
        if slot.is_none_or(|s| seq_after(next, s)) {
            *slot = Some(next);
        }
    };
    // The connection has just echoed: its last segments and ACKs are on the tap already.
    for p in tap.collect_for(Duration::from_millis(300)).unwrap() {
        let ends = (
            SocketAddr::new(p.src, p.src_port.unwrap_or(0)),
            SocketAddr::new(p.dst, p.dst_port.unwrap_or(0)),
        );
        if p.tcp.is_none() {
            continue;
        }
        if ends == (client, server) && !p.outgoing {
            advance(&mut from_client, &p);
        } else if ends == (server, client) && p.outgoing {
            advance(&mut from_server, &p);
        }
    }
    (
        from_client.expect("tap saw the client's segments"),
        from_server.expect("tap saw the server's segments"),
    )
}

/// (b) A data segment and RSTs with a live frontend → orders connection's 4-tuple and exact
/// sequence numbers (as an on-path observer would know them), sent from the intruder. Were
/// they delivered, orders would echo the forged data and reset the connection.
fn injected_segments_do_not_arrive(short: &str, v6: bool) {
    let env = Env::new(short, TopologyOptions::default(), &bound_policy());
    serve_tcp(&env, "orders", v6, 8080);
    let orders_tap = env.tap("orders");
    let intruder_tap = env.tap("intruder");
    env.assert_tap_sees_frontend(&orders_tap, v6);

    let mut conn = tcp_connect(env.ns("frontend"), env.addr("orders", v6), 8080).unwrap();
    assert!(
        echo_roundtrip(&mut conn, b"before"),
        "live connection echoes"
    );
    let (client_next, server_next) = next_sequence_numbers(&orders_tap, &conn);
    let (client, server) = (conn.local_addr().unwrap(), conn.peer_addr().unwrap());
    let forged = b"evil";
    let segment = |flags: u8, seq: u32, payload: &[u8]| TcpSegment {
        src: client,
        dst: server,
        flags,
        seq,
        ack: server_next,
        payload: payload.to_vec(),
    };
    let spoofed_before = env.verdict("drop_spoofed");
    for seg in [
        segment(tcp_flags::PSH | tcp_flags::ACK, client_next, forged),
        // Either sequence number is the exact one, depending on whether the data got in.
        segment(tcp_flags::RST, client_next + forged.len() as u32, &[]),
        segment(tcp_flags::RST, client_next, &[]),
    ] {
        spoof::send_tcp(env.ns("intruder"), &seg).unwrap();
    }
    // The client sends neither RSTs nor data meanwhile: anything like that is forged.
    let forged_kind = |p: &CapturedPacket| {
        p.tcp
            .is_some_and(|t| t.flags & tcp_flags::RST != 0 || p.payload_len > 0)
    };
    let on_tuple = |p: &CapturedPacket| p.src == client.ip() && p.src_port == Some(client.port());
    let arrived = arrivals(&orders_tap, |p| on_tuple(p) && forged_kind(p));
    assert!(
        arrived.is_empty(),
        "injected segments reached orders: {arrived:?}"
    );
    assert_sent(&intruder_tap, "injected segment", |p| {
        on_tuple(p) && forged_kind(p)
    });
    assert!(
        echo_roundtrip(&mut conn, b"after"),
        "the live connection no longer echoes exactly what it sends"
    );
    env.assert_spoofed_counted(spoofed_before);
}

// Depends on the datapath change (anti-spoofing).
#[test]
fn injected_rst_and_data_on_a_live_connection_do_not_arrive_ipv4() {
    injected_segments_do_not_arrive("inject4", false);
}

// Depends on the datapath change (anti-spoofing).
#[test]
fn injected_rst_and_data_on_a_live_connection_do_not_arrive_ipv6() {
    injected_segments_do_not_arrive("inject6", true);
}

/// (c) The intruder takes an address of its own subnet that no identity claims (so it would be
/// `world`, which may reach orders:8081). The reverse path is fine (the subnet is behind
/// tg-intruder), but tg-intruder is bound to the intruder identity and may only send its
/// addresses.
fn unclaimed_address_does_not_reach_world_port(short: &str, v6: bool) {
    let env = Env::new(short, TopologyOptions::default(), &bound_policy());
    serve_tcp(&env, "orders", v6, 8081);
    serve_tcp(&env, "orders", v6, 8080);
    let orders_tap = env.tap("orders");
    let intruder_tap = env.tap("intruder");
    env.assert_tap_sees_frontend(&orders_tap, v6);

    let (unclaimed, prefix_len): (IpAddr, u8) = if v6 {
        ("fd00:200:3::99".parse().unwrap(), 64)
    } else {
        ("10.200.3.99".parse().unwrap(), 24)
    };
    env.topo
        .workload("intruder")
        .add_address(unclaimed, prefix_len)
        .unwrap();
    let orders = SocketAddr::new(env.addr("orders", v6), 8081);
    let spoofed_before = env.verdict("drop_spoofed");
    let connected = tcp_connect_from(env.ns("intruder"), SocketAddr::new(unclaimed, 0), orders);
    spoof::send_tcp(
        env.ns("intruder"),
        &TcpSegment::syn(SocketAddr::new(unclaimed, 40003), orders),
    )
    .unwrap();
    let arrived = arrivals(&orders_tap, |p| p.src == unclaimed);
    assert!(
        arrived.is_empty(),
        "packets from the unclaimed address reached orders: {arrived:?}"
    );
    assert!(
        connected.is_err(),
        "the intruder connected to orders:8081 from {unclaimed}"
    );
    assert_sent(&intruder_tap, "SYN from the unclaimed address", |p| {
        p.src == unclaimed
    });
    env.assert_spoofed_counted(spoofed_before);
}

// Depends on the datapath change (identity-bound interfaces).
#[test]
fn an_unclaimed_address_in_the_intruders_subnet_does_not_reach_a_world_port_ipv4() {
    unclaimed_address_does_not_reach_world_port("unclaim4", false);
}

// Depends on the datapath change (identity-bound interfaces).
#[test]
fn an_unclaimed_address_in_the_intruders_subnet_does_not_reach_a_world_port_ipv6() {
    unclaimed_address_does_not_reach_world_port("unclaim6", true);
}

// ---- A SYN in the reply direction ------------------------------------------------------------------

/// frontend → orders TCP 7500 only. frontend connects from port 45000 to orders:7500, where
/// nothing listens; orders refuses with an RST, which passes as the reply of an allowed flow.
/// orders then connects from port 7500 to frontend:45000: the same 4-tuple in the reply
/// direction, but a new connection that no rule allows.
fn reverse_syn_is_denied(short: &str, v6: bool) {
    let policy = POLICY.replace("port: 8080, protocol: TCP", "port: 7500, protocol: TCP");
    let env = Env::new(short, TopologyOptions::default(), &policy);
    let frontend = env.addr("frontend", v6);
    let orders = env.addr("orders", v6);
    let refused = tcp_connect_from(
        env.ns("frontend"),
        SocketAddr::new(frontend, 45000),
        SocketAddr::new(orders, 7500),
    )
    .expect_err("nothing listens on orders:7500");
    let kind = refused
        .root_cause()
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind);
    assert_eq!(
        kind,
        Some(std::io::ErrorKind::ConnectionRefused),
        "the SYN must pass and the RST come back: {refused:#}"
    );
    tcp_echo_server(env.ns("frontend"), frontend, 45000, 4).unwrap();
    let reverse = tcp_connect_from(
        env.ns("orders"),
        SocketAddr::new(orders, 7500),
        SocketAddr::new(frontend, 45000),
    );
    assert!(
        reverse.is_err(),
        "orders:7500 connected to frontend:45000 on the strength of the refused flow"
    );
}

// Depends on the datapath change (reply-direction SYN).
#[test]
fn a_syn_in_the_reply_direction_of_a_refused_flow_is_denied_ipv4() {
    reverse_syn_is_denied("rsyn4", false);
}

// Depends on the datapath change (reply-direction SYN).
#[test]
fn a_syn_in_the_reply_direction_of_a_refused_flow_is_denied_ipv6() {
    reverse_syn_is_denied("rsyn6", true);
}

// ---- Neighbour discovery across the node ---------------------------------------------------------

/// ND is link-local business: a router never forwards a genuine one (hop limit 255 on arrival
/// is required), so an NS, NA or RA addressed to another workload's global address must not be
/// passed as ND and routed across the node. Control: IPv6 TCP frontend → orders works, which
/// needs ND on both of its links.
// Depends on the datapath change (ND confined to its link).
#[test]
fn neighbour_discovery_from_a_workload_does_not_cross_the_node() {
    let env = Env::new("nd", TopologyOptions::default(), POLICY);
    serve_tcp(&env, "orders", true, 8080);
    let orders_tap = env.tap("orders");
    let intruder_tap = env.tap("intruder");
    env.assert_tap_sees_frontend(&orders_tap, true);

    let IpAddr::V6(orders) = env.addr("orders", true) else {
        unreachable!()
    };
    let intruder = env.addr("intruder", true);
    for message in [
        NdMessage::NeighborAdvertisement { target: orders },
        NdMessage::NeighborSolicitation { target: orders },
        NdMessage::RouterAdvertisement,
    ] {
        spoof::send_nd(env.ns("intruder"), orders, message, 255).unwrap();
    }
    let is_nd = |p: &CapturedPacket| {
        p.proto == spoof::IPPROTO_ICMPV6
            && matches!(
                p.icmp_type,
                Some(NdMessage::ROUTER_ADVERTISEMENT..=NdMessage::NEIGHBOR_ADVERTISEMENT)
            )
    };
    let arrived = arrivals(&orders_tap, |p| p.src == intruder && is_nd(p));
    assert!(
        arrived.is_empty(),
        "neighbour discovery from the intruder reached orders: {arrived:?}"
    );
    assert_sent(&intruder_tap, "ND message", |p| {
        p.dst == IpAddr::V6(orders) && is_nd(p)
    });
}

// ---- An interface without a program ------------------------------------------------------------

/// A pod created while no agent runs has a veth with no program on it at all (the same holds,
/// for up to a second, for one created while the agent runs). Its forged packets must still not
/// reach anyone: the pinned programs check, where a packet leaves toward a workload, the source
/// against the interface it came in by.
fn interface_without_program_cannot_spoof(short: &str, v6: bool) {
    let mut env = Env::new(short, TopologyOptions::default(), POLICY);
    serve_udp(&env, "orders", v6, 9000);
    serve_tcp(&env, "orders", v6, 8081);
    let spoofed_before = env.verdict("drop_spoofed");
    env.agent.stop().unwrap();
    let late = env.topo.add_workload("late").expect("a new workload");
    let late_addr = if v6 {
        IpAddr::V6(late.v6)
    } else {
        IpAddr::V4(late.v4)
    };
    let orders_tap = env.tap("orders");
    let frontend = env.addr("frontend", v6);
    let orders = env.addr("orders", v6);
    for _ in 0..3 {
        spoof::send_udp(
            env.ns("late"),
            SocketAddr::new(frontend, 40011),
            SocketAddr::new(orders, 9000),
            b"forged",
        )
        .unwrap();
    }
    let arrived = arrivals(&orders_tap, |p| {
        p.src == frontend && p.src_port == Some(40011)
    });
    assert!(
        arrived.is_empty(),
        "packets with frontend's address from an unenforced veth reached orders: {arrived:?}"
    );
    // Its own address is a genuine source there (`world`, which may reach orders:8081).
    let ok = tcp_reachable(env.ns("late"), orders, 8081);
    if !ok {
        let policy = env.dir.path().join("policy.yaml");
        env.agent.spawn(&env.topo.node, "tg-*", &policy).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("DEBUG {}", env.agent.log_text());
    }
    assert!(ok, "{late_addr} -> orders:8081 (world) must pass");
    let policy = env.dir.path().join("policy.yaml");
    env.agent.spawn(&env.topo.node, "tg-*", &policy).unwrap();
    env.assert_spoofed_counted(spoofed_before);
}

#[test]
fn a_veth_without_a_program_cannot_spoof_ipv4() {
    interface_without_program_cannot_spoof("noprog4", false);
}

#[test]
fn a_veth_without_a_program_cannot_spoof_ipv6() {
    interface_without_program_cannot_spoof("noprog6", true);
}

/// A pod created while the agent runs (its veth named in a binding before it existed) is
/// described and attached at once, binding included: an unclaimed address of its own subnet
/// does not reach what `world` may reach.
fn new_pod_gets_its_binding(short: &str, v6: bool) {
    let late = "      cidrs: [\"10.200.3.2/32\", \"fd00:200:3::2/128\"]\n";
    let policy = POLICY.replace(
        late,
        &format!(
            "{late}    - name: late\n      cidrs: [\"10.200.4.2/32\", \"fd00:200:4::2/128\"]\n      interfaces: [\"tg-late\"]\n"
        ),
    );
    assert_ne!(policy, POLICY);
    let mut env = Env::new(short, TopologyOptions::default(), &policy);
    serve_tcp(&env, "orders", v6, 8081);
    let spoofed_before = env.verdict("drop_spoofed");
    env.topo.add_workload("late").expect("a new workload");
    // Wait (bounded) until the agent has attached to it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = env.agent.cli(&["status", "--json"]).unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let bound = status["interfaces"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["name"] == "tg-late" && i["bound_identity"] == "late");
        if bound {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tg-late not enforced: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let unclaimed: IpAddr = if v6 {
        "fd00:200:4::99".parse().unwrap()
    } else {
        "10.200.4.99".parse().unwrap()
    };
    env.topo
        .workload("late")
        .add_address(unclaimed, if v6 { 128 } else { 32 })
        .unwrap();
    let orders = SocketAddr::new(env.addr("orders", v6), 8081);
    assert!(
        tcp_connect_from(env.ns("late"), SocketAddr::new(unclaimed, 0), orders).is_err(),
        "an unclaimed address on a bound new pod reached a world port"
    );
    env.assert_spoofed_counted(spoofed_before);
    // From its own address it is `late`, which no rule lets reach orders:8081: denied by
    // policy, not as spoofed. (Bound explicitly: with a second address on eth0, IPv6 source
    // selection may pick either.)
    let own = env.topo.workload("late");
    let own: IpAddr = if v6 { own.v6.into() } else { own.v4.into() };
    let denied = env.verdict_count("deny_default");
    assert!(tcp_connect_from(env.ns("late"), SocketAddr::new(own, 0), orders).is_err());
    assert!(env.verdict_count("deny_default") > denied);
    // (The squatted address's own neighbour discovery is dropped as spoofed too, so the
    // counter alone says nothing here; the events name each packet's source.)
    let wrongly = format!("drop_spoofed tcp {own} ->");
    assert!(
        !env.agent.log_text().contains(&wrongly),
        "own address dropped as spoofed"
    );
}

#[test]
fn a_pod_created_while_the_agent_runs_gets_its_binding_ipv4() {
    new_pod_gets_its_binding("late4", false);
}

#[test]
fn a_pod_created_while_the_agent_runs_gets_its_binding_ipv6() {
    new_pod_gets_its_binding("late6", true);
}

// ---- NAT on the node ---------------------------------------------------------------------------

/// A service address in front of orders, as kube-proxy's nftables mode makes one: the node
/// DNATs 10.200.60.10:80 / [fd00:200:60::10]:80 to orders:8080. The reply leaves toward
/// frontend with the service address as source (netfilter undoes the DNAT before the egress
/// hook): it came in by tg-orders, where it was checked before the NAT, and must pass.
fn service_reply_after_dnat_passes(short: &str, v6: bool) {
    let policy = POLICY.replace(
        "    - name: world-to-orders\n",
        "    - name: frontend-to-services\n      from: frontend\n      to: world\n      ports:\n        - { port: 80, protocol: TCP }\n    - name: world-to-orders\n",
    );
    assert_ne!(policy, POLICY);
    let env = Env::new(short, TopologyOptions::default(), &policy);
    serve_tcp(&env, "orders", v6, 8080);
    let rules = "table inet tgsvc {
  chain pre {
    type nat hook prerouting priority -100;
    ip daddr 10.200.60.10 tcp dport 80 dnat ip to 10.200.2.2:8080
    ip6 daddr fd00:200:60::10 tcp dport 80 dnat ip6 to [fd00:200:2::2]:8080
  }
}
";
    let mut nft = env
        .topo
        .node
        .exec(&["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft (is nftables installed?)");
    use std::io::Write as _;
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft rules");
    // A real node has a default route (here: toward the intruder's veth, standing in for the
    // uplink), so the service address routes out of an interface other than tg-orders.
    for args in [
        &["route", "add", "default", "via", "10.200.3.2"][..],
        &["-6", "route", "add", "default", "via", "fd00:200:3::2"][..],
    ] {
        env.topo
            .node
            .exec_checked(&[&["ip"][..], args].concat())
            .unwrap();
    }
    let service: IpAddr = if v6 {
        "fd00:200:60::10".parse().unwrap()
    } else {
        "10.200.60.10".parse().unwrap()
    };
    let spoofed = env.verdict_count("drop_spoofed");
    assert!(
        tcp_reachable(env.ns("frontend"), service, 80),
        "frontend -> service (DNAT to orders) failed"
    );
    assert_eq!(
        env.verdict_count("drop_spoofed"),
        spoofed,
        "a DNAT reply was taken for spoofed:\n{}",
        env.agent.log_text()
    );
}

#[test]
fn a_service_reply_after_dnat_passes_ipv4() {
    service_reply_after_dnat_passes("dnat4", false);
}

#[test]
fn a_service_reply_after_dnat_passes_ipv6() {
    service_reply_after_dnat_passes("dnat6", true);
}
