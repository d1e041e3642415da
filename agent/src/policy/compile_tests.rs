//! Compiling: the entries are checked by what a longest-prefix-match lookup over them answers,
//! the way the kernel's LPM trie will, rather than by their exact layout.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use tollgate_common::{
    decide,
    identity::{IDENTITY_FIRST_USER, IDENTITY_HOST, IDENTITY_WORLD},
    ratelimit::{kind, LIMIT_FLAG_AUDIT},
    rule::{
        RULE_FLAG_ALLOW, RULE_FLAG_AUDIT, RULE_FLAG_AUTH_MTLS, RULE_FULL_PREFIX_BITS,
        RULE_PAIR_PREFIX_BITS, RULE_PROTO_PREFIX_BITS,
    },
    IdentityKeyV4, IdentityKeyV6, IdentityValue, RuleKey, RuleValue, Verdict, POLICY_FLAG_AUDIT,
};

use super::*;

const A: u32 = IDENTITY_FIRST_USER;
const B: u32 = IDENTITY_FIRST_USER + 1;
const C: u32 = IDENTITY_FIRST_USER + 2;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const GRE: u8 = 47;

const SEC: u64 = 1_000_000_000;
/// Booted 1.7e9 s after the epoch (late 2023), 1000 s ago.
const CLOCK: ClockReading = ClockReading {
    realtime_ns: 1_700_001_000 * SEC,
    boottime_ns: 1_000 * SEC,
};

/// A policy with identities a, b, c and the given rules (YAML list items, one per line).
fn policy_with(mode: &str, rules: &[&str]) -> Policy {
    let mut text = format!(
        "apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{ name: test }}
spec:
  mode: {mode}
  identities:
    - {{ name: a, cidrs: [10.0.1.0/24, \"fd00:1::/64\"] }}
    - {{ name: b, cidrs: [10.0.2.0/24] }}
    - {{ name: c, cidrs: [10.0.3.1] }}
  rules:
"
    );
    for (i, rule) in rules.iter().enumerate() {
        text.push_str(&format!("    - {{ name: r{}, {rule} }}\n", i + 1));
    }
    parse_policy(&text, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn compile(rules: &[&str]) -> CompiledPolicy {
    compile_policy(&policy_with("enforce", rules), 0, &CLOCK, &[])
}

/// The bytes of a rule key as the LPM trie sees them (its memory layout).
fn rule_key_bytes(k: &RuleKey) -> Vec<u8> {
    let mut b = k.slot.to_ne_bytes().to_vec();
    b.extend(k.src);
    b.extend(k.dst);
    b.push(k.proto);
    b.extend(k.port);
    b.push(k._pad);
    b
}

/// Do the first `bits` bits (most significant first in each byte) agree?
fn prefix_matches(entry: &[u8], key: &[u8], bits: u32) -> bool {
    let (whole, rest) = (bits as usize / 8, bits % 8);
    let mask = !(0xffu8 >> rest);
    entry[..whole] == key[..whole] && (rest == 0 || entry[whole] & mask == key[whole] & mask)
}

/// The value the kernel's LPM lookup would find, with its prefix length.
fn lookup_entry(
    c: &CompiledPolicy,
    src: u32,
    dst: u32,
    proto: u8,
    port: u16,
) -> Option<(u32, RuleValue)> {
    let key = rule_key_bytes(&RuleKey::new(c.slot, src, dst, proto, port));
    c.rules
        .iter()
        .filter(|(len, k, _)| prefix_matches(&rule_key_bytes(k), &key, *len))
        .max_by_key(|(len, _, _)| *len)
        .map(|(len, _, v)| (*len, *v))
}

fn lookup(c: &CompiledPolicy, src: u32, dst: u32, proto: u8, port: u16) -> Option<RuleValue> {
    lookup_entry(c, src, dst, proto, port).map(|(_, v)| v)
}

/// The id of the rule that allows, or None.
fn allowed_by(c: &CompiledPolicy, src: u32, dst: u32, proto: u8, port: u16) -> Option<u32> {
    lookup(c, src, dst, proto, port)
        .filter(|v| v.flags & RULE_FLAG_ALLOW != 0)
        .map(|v| v.rule_id)
}

fn identity_v4(c: &CompiledPolicy, addr: Ipv4Addr) -> u32 {
    let mut key = c.slot.to_ne_bytes().to_vec();
    key.extend(addr.octets());
    c.identities_v4
        .iter()
        .filter(|(len, k, _)| {
            let mut entry = k.slot.to_ne_bytes().to_vec();
            entry.extend(k.addr);
            prefix_matches(&entry, &key, *len)
        })
        .max_by_key(|(len, _, _)| *len)
        .map_or(IDENTITY_WORLD, |(_, _, v)| v.id)
}

#[test]
fn exact_port_hits_and_its_neighbours_miss() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: TCP, port: 8080 }]"]);
    assert_eq!(allowed_by(&c, A, B, TCP, 8080), Some(1));
    assert_eq!(
        lookup_entry(&c, A, B, TCP, 8080).unwrap().0,
        RULE_FULL_PREFIX_BITS
    );
    assert_eq!(lookup(&c, A, B, TCP, 8079), None);
    assert_eq!(lookup(&c, A, B, TCP, 8081), None);
    assert_eq!(lookup(&c, A, B, UDP, 8080), None);
}

#[test]
fn port_range_covers_exactly_its_edges() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: UDP, port: 9000, endPort: 9100 }]"]);
    assert_eq!(lookup(&c, A, B, UDP, 8999), None);
    assert_eq!(allowed_by(&c, A, B, UDP, 9000), Some(1));
    assert_eq!(allowed_by(&c, A, B, UDP, 9050), Some(1));
    assert_eq!(allowed_by(&c, A, B, UDP, 9100), Some(1));
    assert_eq!(lookup(&c, A, B, UDP, 9101), None);
}

#[test]
fn tcp_without_port_allows_every_port() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: TCP }]"]);
    for port in [0, 1, 443, 65535] {
        assert_eq!(allowed_by(&c, A, B, TCP, port), Some(1), "port {port}");
    }
    assert_eq!(c.rules.len(), 1);
    assert_eq!(c.rules[0].0, RULE_PROTO_PREFIX_BITS);
    assert_eq!(lookup(&c, A, B, UDP, 443), None);
}

#[test]
fn icmp_entry_matches_whatever_the_port_field_holds() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: ICMP }]"]);
    assert_eq!(c.rules.len(), 1);
    assert_eq!(c.rules[0].0, RULE_PROTO_PREFIX_BITS);
    for port in [0, 8, 65535] {
        assert_eq!(allowed_by(&c, A, B, ICMP, port), Some(1));
    }
    assert_eq!(lookup(&c, A, B, TCP, 0), None);
}

#[test]
fn any_protocol_covers_tcp_udp_and_others() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: ANY }]"]);
    assert_eq!(c.rules.len(), 1);
    assert_eq!(c.rules[0].0, RULE_PAIR_PREFIX_BITS);
    assert_eq!(allowed_by(&c, A, B, TCP, 22), Some(1));
    assert_eq!(allowed_by(&c, A, B, UDP, 53), Some(1));
    assert_eq!(allowed_by(&c, A, B, GRE, 0), Some(1));
}

#[test]
fn any_protocol_rule_is_not_shadowed_by_a_weaker_port_rule() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: TCP, port: 80 }], expires: \"2030-01-01T00:00:00Z\"",
        "from: a, to: b, ports: [{ protocol: ANY }]",
    ]);
    assert_eq!(allowed_by(&c, A, B, TCP, 80), Some(2));
    assert_eq!(allowed_by(&c, A, B, TCP, 81), Some(2));
    assert_eq!(allowed_by(&c, A, B, UDP, 80), Some(2));
}

#[test]
fn port_rule_that_outranks_any_protocol_decides_its_port() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: ANY }], expires: \"2030-01-01T00:00:00Z\"",
        "from: a, to: b, ports: [{ protocol: TCP, port: 80 }]",
    ]);
    assert_eq!(allowed_by(&c, A, B, TCP, 80), Some(2));
    assert_eq!(allowed_by(&c, A, B, TCP, 81), Some(1));
    assert_eq!(allowed_by(&c, A, B, UDP, 80), Some(1));
}

#[test]
fn non_expiring_rule_beats_expiring_one_where_they_overlap() {
    for (grant, standing) in [(1, 2), (2, 1)] {
        let mut rules = [
            "from: a, to: b, ports: [{ protocol: TCP, port: 8000, endPort: 9000 }], expires: \"2030-01-01T00:00:00Z\"",
            "from: a, to: b, ports: [{ protocol: TCP, port: 8080 }]",
        ];
        if grant == 2 {
            rules.reverse();
        }
        let c = compile(&rules);
        assert_eq!(allowed_by(&c, A, B, TCP, 8080), Some(standing));
        assert_eq!(allowed_by(&c, A, B, TCP, 8079), Some(grant));
        assert_eq!(allowed_by(&c, A, B, TCP, 8081), Some(grant));
        assert_eq!(allowed_by(&c, A, B, TCP, 8000), Some(grant));
        assert_eq!(allowed_by(&c, A, B, TCP, 9000), Some(grant));
        assert_eq!(lookup(&c, A, B, TCP, 9001), None);
    }
}

#[test]
fn later_expiry_beats_earlier_expiry() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: TCP }], expires: \"2030-01-01T00:00:00Z\"",
        "from: a, to: b, ports: [{ protocol: TCP }], expires: \"2031-01-01T00:00:00Z\"",
    ]);
    assert_eq!(allowed_by(&c, A, B, TCP, 443), Some(2));
}

#[test]
fn enforce_rule_beats_audit_rule_where_they_overlap() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: TCP }], mode: audit",
        "from: a, to: b, ports: [{ protocol: TCP, port: 443 }]",
    ]);
    let at_443 = lookup(&c, A, B, TCP, 443).unwrap();
    assert_eq!((at_443.rule_id, at_443.flags), (2, RULE_FLAG_ALLOW));
    let at_80 = lookup(&c, A, B, TCP, 80).unwrap();
    assert_eq!(
        (at_80.rule_id, at_80.flags),
        (1, RULE_FLAG_ALLOW | RULE_FLAG_AUDIT)
    );
}

/// Identities a and b with SPIFFE IDs, and the given rules between them.
fn compile_with_spiffe_ids(rules: &[&str]) -> CompiledPolicy {
    let mut text = "apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: { name: test }
spec:
  identities:
    - { name: a, spiffeId: spiffe://t.test/a, cidrs: [10.0.1.0/24] }
    - { name: b, spiffeId: spiffe://t.test/b, cidrs: [10.0.2.0/24] }
  rules:
"
    .to_owned();
    for (i, rule) in rules.iter().enumerate() {
        text.push_str(&format!("    - {{ name: r{}, {rule} }}\n", i + 1));
    }
    let policy = parse_policy(&text, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    compile_policy(&policy, 0, &CLOCK, &[])
}

#[test]
fn mtls_rule_entries_require_authentication() {
    let c = compile_with_spiffe_ids(&[
        "from: a, to: b, ports: [{ protocol: TCP, port: 443 }], authentication: mtls",
    ]);
    let entry = lookup(&c, A, B, TCP, 443).unwrap();
    assert_eq!(entry.flags, RULE_FLAG_ALLOW | RULE_FLAG_AUTH_MTLS);
    assert_eq!(
        entry.auth_pair,
        auth_pair_key("spiffe://t.test/a", "spiffe://t.test/b")
    );
}

#[test]
fn pair_keys_depend_on_both_ids_and_their_order() {
    let ab = auth_pair_key("spiffe://t.test/a", "spiffe://t.test/b");
    assert_ne!(ab, auth_pair_key("spiffe://t.test/b", "spiffe://t.test/a"));
    // The length prefix keeps the boundary between the two IDs.
    assert_ne!(
        auth_pair_key("spiffe://t.test/ab", "c"),
        auth_pair_key("spiffe://t.test/a", "bc")
    );
    assert_ne!(ab, 0);
}

#[test]
fn authenticated_rule_beats_unauthenticated_one_where_they_overlap() {
    // Otherwise a broad rule without authentication would lift the requirement of a narrow one.
    let c = compile_with_spiffe_ids(&[
        "from: a, to: b, ports: [{ protocol: TCP }]",
        "from: a, to: b, ports: [{ protocol: TCP, port: 443 }], authentication: mtls",
    ]);
    let at_443 = lookup(&c, A, B, TCP, 443).unwrap();
    assert_eq!(
        (at_443.rule_id, at_443.flags),
        (2, RULE_FLAG_ALLOW | RULE_FLAG_AUTH_MTLS)
    );
    let at_80 = lookup(&c, A, B, TCP, 80).unwrap();
    assert_eq!((at_80.flags, at_80.auth_pair), (RULE_FLAG_ALLOW, 0));
}

#[test]
fn earlier_rule_wins_a_tie() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: UDP, port: 53 }]",
        "from: a, to: b, ports: [{ protocol: UDP, port: 50, endPort: 60 }]",
    ]);
    assert_eq!(allowed_by(&c, A, B, UDP, 53), Some(1));
    assert_eq!(allowed_by(&c, A, B, UDP, 54), Some(2));
}

#[test]
fn protocol_entries_of_a_pair_never_overlap() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: TCP, port: 100, endPort: 2000 }], expires: \"2030-01-01T00:00:00Z\"",
        "from: a, to: b, ports: [{ protocol: TCP, port: 1000, endPort: 3000 }], mode: audit",
        "from: a, to: b, ports: [{ protocol: TCP, port: 1500 }, { protocol: TCP, port: 1501 }]",
        "from: a, to: b, ports: [{ protocol: ANY }], expires: \"2029-01-01T00:00:00Z\"",
    ]);
    let tcp: Vec<(u32, Vec<u8>)> = c
        .rules
        .iter()
        .filter(|(_, k, _)| k.proto == TCP)
        .map(|(len, k, _)| (*len, rule_key_bytes(k)))
        .collect();
    for port in 0..=u16::MAX {
        let key = rule_key_bytes(&RuleKey::new(0, A, B, TCP, port));
        let matching = tcp
            .iter()
            .filter(|(len, entry)| prefix_matches(entry, &key, *len))
            .count();
        assert_eq!(matching, 1, "port {port}");
    }
    assert_eq!(allowed_by(&c, A, B, TCP, 50), Some(4));
    assert_eq!(allowed_by(&c, A, B, TCP, 100), Some(1));
    assert_eq!(allowed_by(&c, A, B, TCP, 1500), Some(3));
    assert_eq!(allowed_by(&c, A, B, TCP, 999), Some(1));
    // A standing audit rule outranks an expiring enforce rule.
    assert_eq!(allowed_by(&c, A, B, TCP, 1502), Some(2));
    assert_eq!(allowed_by(&c, A, B, TCP, 2001), Some(2));
    assert_eq!(allowed_by(&c, A, B, TCP, 3001), Some(4));
}

#[test]
fn adjacent_pieces_of_one_rule_are_merged() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: TCP, port: 1024, endPort: 1535 }, { protocol: TCP, port: 1536, endPort: 2047 }]"]);
    assert_eq!(c.rules.len(), 1);
    assert_eq!(c.rules[0].0, RULE_PROTO_PREFIX_BITS + 6);
}

#[test]
fn audit_rule_adds_a_fallback_that_names_it_for_unallowed_traffic() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: TCP, port: 80 }], mode: audit"]);
    let fallback = lookup_entry(&c, A, B, UDP, 53).unwrap();
    assert_eq!(fallback.0, RULE_PAIR_PREFIX_BITS);
    assert_eq!((fallback.1.rule_id, fallback.1.flags), (1, RULE_FLAG_AUDIT));
    let decision = decide(Some(&fallback.1), c.flags, 1);
    assert_eq!(
        (decision.verdict, decision.rule_id),
        (Verdict::AuditWouldDeny, 1)
    );
    assert_eq!(allowed_by(&c, A, B, TCP, 80), Some(1));
}

#[test]
fn audit_fallback_names_the_best_audit_rule() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: TCP, port: 80 }], mode: audit, expires: \"2030-01-01T00:00:00Z\"",
        "from: a, to: b, ports: [{ protocol: TCP, port: 81 }]",
        "from: a, to: b, ports: [{ protocol: TCP, port: 82 }], mode: audit",
    ]);
    assert_eq!(lookup(&c, A, B, TCP, 9).unwrap().rule_id, 3);
}

#[test]
fn no_fallback_without_an_audit_rule() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: TCP, port: 80 }]"]);
    assert_eq!(lookup(&c, A, B, TCP, 81), None);
    assert_eq!(lookup(&c, A, B, UDP, 53), None);
}

#[test]
fn any_protocol_rule_replaces_the_audit_fallback() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: TCP, port: 80 }], mode: audit",
        "from: a, to: b, ports: [{ protocol: ANY }]",
    ]);
    let pair_entries: Vec<_> = c
        .rules
        .iter()
        .filter(|(len, _, _)| *len == RULE_PAIR_PREFIX_BITS)
        .collect();
    assert_eq!(pair_entries.len(), 1);
    assert_eq!(pair_entries[0].2.rule_id, 2);
    assert_eq!(pair_entries[0].2.flags, RULE_FLAG_ALLOW);
}

#[test]
fn rules_of_one_pair_do_not_leak_to_others() {
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: ANY }]",
        "from: b, to: c, ports: [{ protocol: TCP }], mode: audit",
    ]);
    assert_eq!(lookup(&c, B, A, TCP, 80), None);
    assert_eq!(lookup(&c, A, C, TCP, 80), None);
    assert_eq!(lookup(&c, C, B, TCP, 80), None);
    assert_eq!(lookup(&c, A, B, TCP, 80).unwrap().rule_id, 1);
    assert_eq!(lookup(&c, B, C, TCP, 80).unwrap().rule_id, 2);
    assert_eq!(lookup(&c, B, C, UDP, 80).unwrap().flags, RULE_FLAG_AUDIT);
}

#[test]
fn rule_keys_carry_the_slot() {
    let p = policy_with(
        "enforce",
        &["from: a, to: b, ports: [{ protocol: TCP, port: 80 }]"],
    );
    let c = compile_policy(&p, 1, &CLOCK, &[]);
    assert!(c.rules.iter().all(|(_, k, _)| k.slot == 1));
    assert_eq!(allowed_by(&c, A, B, TCP, 80), Some(1));
    let other_slot = CompiledPolicy { slot: 0, ..c };
    assert_eq!(lookup(&other_slot, A, B, TCP, 80), None);
}

#[test]
fn reserved_identities_get_their_fixed_ids() {
    let c = compile(&[
        "from: world, to: host, ports: [{ protocol: TCP, port: 22 }]",
        "from: host, to: c, ports: [{ protocol: UDP }]",
    ]);
    assert_eq!(
        allowed_by(&c, IDENTITY_WORLD, IDENTITY_HOST, TCP, 22),
        Some(1)
    );
    assert_eq!(allowed_by(&c, IDENTITY_HOST, C, UDP, 5), Some(2));
}

#[test]
fn identity_entries_carry_slot_and_prefix_length() {
    let p = policy_with("enforce", &[]);
    let c = compile_policy(&p, 1, &CLOCK, &[]);
    let value = |id| IdentityValue {
        id,
        ..Default::default()
    };
    assert_eq!(
        c.identities_v4,
        [
            (
                56,
                IdentityKeyV4 {
                    slot: 1,
                    addr: [10, 0, 1, 0]
                },
                value(A)
            ),
            (
                56,
                IdentityKeyV4 {
                    slot: 1,
                    addr: [10, 0, 2, 0]
                },
                value(B)
            ),
            (
                64,
                IdentityKeyV4 {
                    slot: 1,
                    addr: [10, 0, 3, 1]
                },
                value(C)
            ),
        ]
    );
    let fd00_1: Ipv6Addr = "fd00:1::".parse().unwrap();
    assert_eq!(
        c.identities_v6,
        [(
            96,
            IdentityKeyV6 {
                slot: 1,
                addr: fd00_1.octets()
            },
            value(A)
        )]
    );
}

#[test]
fn identity_lookup_resolves_addresses() {
    let c = compile(&[]);
    assert_eq!(identity_v4(&c, Ipv4Addr::new(10, 0, 1, 200)), A);
    assert_eq!(identity_v4(&c, Ipv4Addr::new(10, 0, 3, 1)), C);
    assert_eq!(identity_v4(&c, Ipv4Addr::new(10, 0, 3, 2)), IDENTITY_WORLD);
}

#[test]
fn node_addresses_an_identity_claims_keep_it_and_are_marked_as_the_nodes() {
    use tollgate_common::identity::IDENTITY_FLAG_NODE_ADDRESS;
    // 10.0.1.5 lies in a's 10.0.1.0/24; 10.0.3.1 is c's own /32.
    let host_addrs: Vec<IpAddr> = ["10.0.1.5", "10.0.3.1"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let c = compile_policy(&policy_with("enforce", &[]), 0, &CLOCK, &host_addrs);
    let mut marked: Vec<_> = c
        .identities_v4
        .iter()
        .filter(|e| e.2.flags & IDENTITY_FLAG_NODE_ADDRESS != 0)
        .map(|e| (e.0, e.1.addr, e.2.id))
        .collect();
    marked.sort();
    assert_eq!(marked, [(64, [10, 0, 1, 5], A), (64, [10, 0, 3, 1], C)]);
    // One entry per key: c's own /32 was marked, not doubled.
    let c_entries = c
        .identities_v4
        .iter()
        .filter(|e| e.1.addr == [10, 0, 3, 1])
        .count();
    assert_eq!(c_entries, 1);
    assert_eq!(identity_v4(&c, Ipv4Addr::new(10, 0, 1, 5)), A);
    assert_eq!(identity_v4(&c, Ipv4Addr::new(10, 0, 1, 6)), A);
}

#[test]
fn host_addresses_claimed_by_an_identity_are_left_out() {
    let host_addrs: Vec<IpAddr> = [
        "10.0.1.5",
        "192.168.1.1",
        "fd00:1::9",
        "2001:db8::1",
        "192.168.1.1",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    let c = compile_policy(&policy_with("enforce", &[]), 0, &CLOCK, &host_addrs);
    let host = IdentityValue {
        id: IDENTITY_HOST,
        flags: 0,
        ..Default::default()
    };
    let hosts_v4: Vec<_> = c.identities_v4.iter().filter(|e| e.2 == host).collect();
    assert_eq!(
        hosts_v4,
        [&(
            64,
            IdentityKeyV4 {
                slot: 0,
                addr: [192, 168, 1, 1]
            },
            host
        )]
    );
    let db8: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let hosts_v6: Vec<_> = c.identities_v6.iter().filter(|e| e.2 == host).collect();
    assert_eq!(
        hosts_v6,
        [&(
            160,
            IdentityKeyV6 {
                slot: 0,
                addr: db8.octets()
            },
            host
        )]
    );
    assert_eq!(identity_v4(&c, Ipv4Addr::new(10, 0, 1, 5)), A);
    assert_eq!(
        identity_v4(&c, Ipv4Addr::new(192, 168, 1, 1)),
        IDENTITY_HOST
    );
}

#[test]
fn expiry_is_converted_to_boot_time() {
    let c =
        compile(&["from: a, to: b, ports: [{ protocol: TCP }], expires: \"2023-11-14T22:30:00Z\""]);
    // 2023-11-14T22:30:00Z is 1_700_001_000 s after the epoch, exactly "now" in CLOCK.
    let expected = 1_700_001_000 * SEC - (CLOCK.realtime_ns - CLOCK.boottime_ns);
    assert_eq!(expected, CLOCK.boottime_ns);
    assert_eq!(lookup(&c, A, B, TCP, 1).unwrap().expires_ns, expected);
}

#[test]
fn expiry_before_boot_is_already_expired_not_never() {
    let c =
        compile(&["from: a, to: b, ports: [{ protocol: TCP }], expires: \"2001-01-01T00:00:00Z\""]);
    assert_eq!(lookup(&c, A, B, TCP, 1).unwrap().expires_ns, 1);
}

#[test]
fn rule_without_expiry_never_expires() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: TCP }]"]);
    assert_eq!(lookup(&c, A, B, TCP, 1).unwrap().expires_ns, 0);
}

#[test]
fn policy_audit_mode_sets_the_slot_flag_only() {
    let audit = compile_policy(
        &policy_with("audit", &["from: a, to: b, ports: [{ protocol: TCP }]"]),
        0,
        &CLOCK,
        &[],
    );
    assert_eq!(audit.flags, POLICY_FLAG_AUDIT);
    assert_eq!(lookup(&audit, A, B, TCP, 1).unwrap().flags, RULE_FLAG_ALLOW);
    assert_eq!(compile(&[]).flags, 0);
}

#[test]
fn names_are_found_by_id() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: TCP }]"]);
    assert_eq!(c.names.rule_name(0), "default-deny");
    assert_eq!(c.names.rule_name(1), "r1");
    assert_eq!(c.names.rule_name(2), "unknown");
    assert_eq!(c.names.identity_name(IDENTITY_HOST), "host");
    assert_eq!(c.names.identity_name(IDENTITY_WORLD), "world");
    assert_eq!(c.names.identity_name(B), "b");
    assert_eq!(c.names.identity_name(C + 1), "unknown");
    assert_eq!(c.names.identity_name(0), "unknown");
}

#[test]
fn clock_reading_reads_both_clocks() {
    let now = ClockReading::now();
    assert!(now.boottime_ns > 0);
    // Wall-clock time is far past the time since boot on any real machine.
    assert!(now.realtime_ns > now.boottime_ns);
    let in_an_hour = SystemTime::now() + Duration::from_secs(3600);
    assert!(now.boot_ns(in_an_hour) > now.boottime_ns);
}

#[test]
fn hundred_thousand_rules_compile() {
    let identities: Vec<Identity> = (0..1000u32)
        .map(|i| Identity {
            name: format!("id-{i}"),
            spiffe_id: None,
            auth_address: None,
            cidrs: vec![IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)).into()],
            interfaces: Vec::new(),
            selector: None,
        })
        .collect();
    let rules: Vec<Rule> = (0..100_000u32)
        .map(|i| Rule {
            name: format!("rule-{i}"),
            from: format!("id-{}", i % 1000),
            to: format!("id-{}", (i / 1000) % 1000),
            ports: vec![PortSpec {
                protocol: Protocol::Tcp,
                port: Some(1 + (i / 1_000_000) as u16),
                end_port: None,
            }],
            mode: None,
            log: None,
            expires: None,
            rate_limit: None,
            authentication: None,
        })
        .collect();
    let policy = Policy {
        name: "big".to_owned(),
        mode: Mode::Enforce,
        log: false,
        identities,
        rules,
        rate_limits: Vec::new(),
        source_text: String::new(),
    };
    let c = compile_policy(&policy, 0, &CLOCK, &[]);
    assert_eq!(c.rules.len(), 100_000);
    assert_eq!(c.identities_v4.len(), 1000);
    assert_eq!(c.names.rule_names.len(), 100_000);
}

/// A policy with identities a, b, c, the given rules (whole flow mappings' contents, names
/// included) and quotas (`spec.rateLimits` entries' contents).
fn limits_policy(mode: &str, rules: &[&str], quotas: &[&str]) -> Policy {
    let mut text = format!(
        "apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata: {{ name: test }}
spec:
  mode: {mode}
  identities:
    - {{ name: a, cidrs: [10.0.1.0/24, \"fd00:1::/64\"] }}
    - {{ name: b, cidrs: [10.0.2.0/24] }}
    - {{ name: c, cidrs: [10.0.3.1, \"fd00:3::1\"] }}
  rules:
"
    );
    for rule in rules {
        text.push_str(&format!("    - {{ {rule} }}\n"));
    }
    if !quotas.is_empty() {
        text.push_str("  rateLimits:\n");
        for quota in quotas {
            text.push_str(&format!("    - {{ {quota} }}\n"));
        }
    }
    parse_policy(&text, "test.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn compile_limits(mode: &str, rules: &[&str], quotas: &[&str]) -> CompiledPolicy {
    compile_policy(&limits_policy(mode, rules, quotas), 0, &CLOCK, &[])
}

/// The limit of `owner` in `c`: its position (limit_id) and itself.
fn limit_of<'c>(c: &'c CompiledPolicy, owner: &LimitOwner) -> (u32, &'c CompiledLimit) {
    let i = c
        .limits
        .iter()
        .position(|l| l.owner == *owner)
        .unwrap_or_else(|| panic!("no limit of {owner}"));
    (i as u32 + 1, &c.limits[i])
}

fn rule_owner(name: &str) -> LimitOwner {
    LimitOwner::Rule(name.to_owned())
}

fn identity_owner(name: &str) -> LimitOwner {
    LimitOwner::Identity(name.to_owned())
}

#[test]
fn policy_without_limits_compiles_none() {
    let c = compile(&["from: a, to: b, ports: [{ protocol: TCP }]"]);
    assert!(c.limits.is_empty());
    assert!(c.rules.iter().all(|(_, _, v)| v.limit_id == 0));
    assert!(c.identities_v4.iter().all(|(_, _, v)| v.limit_id == 0));
}

#[test]
fn rule_limits_are_numbered_in_rule_order_then_quotas_in_file_order() {
    let c = compile_limits(
        "enforce",
        &[
            "name: plain, from: a, to: b, ports: [{ protocol: TCP, port: 80 }]",
            "name: login, from: a, to: b, ports: [{ protocol: TCP, port: 22 }], \
             rateLimit: { connectionsPerMinute: 5 }",
            "name: bulk, from: b, to: c, ports: [{ protocol: UDP }], \
             rateLimit: { packetsPerSecond: 1000, bytesPerSecond: 1048576, burst: 10 }",
        ],
        &[
            "identity: c, connectionsPerSecond: 100, burst: 200",
            "identity: a, packetsPerSecond: 50",
        ],
    );
    let owners: Vec<String> = c.limits.iter().map(|l| l.owner.to_string()).collect();
    assert_eq!(
        owners,
        ["rule login", "rule bulk", "identity c", "identity a"]
    );
    let bulk = &c.limits[1];
    assert_eq!(bulk.kinds, bulk.limit.kinds());
    assert_eq!(
        bulk.kinds[kind::PACKETS],
        Some(KindLimit {
            count: 1000,
            period_ns: SEC,
            burst: 10
        })
    );
    assert_eq!(bulk.kinds[kind::CONNECTIONS], None);
    assert_eq!(
        bulk.limit.describe(),
        "1000 packets/s (burst 10), 1048576 bytes/s (burst 1048576)"
    );
    assert_eq!(bulk.flags, 0);
    assert_ne!(bulk.fingerprint, 0);
}

#[test]
fn allowing_entries_of_a_limited_rule_carry_its_position() {
    let c = compile_limits(
        "enforce",
        &[
            "name: plain, from: a, to: b, ports: [{ protocol: TCP, port: 80 }]",
            "name: login, from: a, to: b, ports: [{ protocol: TCP, port: 22 }], \
             rateLimit: { connectionsPerMinute: 5 }",
            "name: range, from: b, to: c, ports: [{ protocol: UDP, port: 9000, endPort: 9100 }, \
             { protocol: ICMP }], rateLimit: { packetsPerSecond: 10 }",
            "name: any, from: c, to: a, ports: [{ protocol: ANY }], \
             rateLimit: { bytesPerSecond: 4096 }",
        ],
        &[],
    );
    assert_eq!(lookup(&c, A, B, TCP, 22).unwrap().limit_id, 1);
    assert_eq!(lookup(&c, A, B, TCP, 80).unwrap().limit_id, 0);
    // Every entry of the port range (aligned blocks) and of its ICMP entry.
    let range_entries: Vec<_> = c.rules.iter().filter(|(_, _, v)| v.rule_id == 3).collect();
    assert!(range_entries.len() > 2, "{range_entries:?}");
    assert!(range_entries.iter().all(|(_, _, v)| v.limit_id == 2));
    for port in [9000, 9050, 9100] {
        assert_eq!(lookup(&c, B, C, UDP, port).unwrap().limit_id, 2);
    }
    assert_eq!(lookup(&c, B, C, ICMP, 0).unwrap().limit_id, 2);
    assert_eq!(lookup(&c, C, A, GRE, 0).unwrap().limit_id, 3);
    assert_eq!(lookup(&c, C, A, TCP, 443).unwrap().limit_id, 3);
}

#[test]
fn a_port_decided_by_another_rule_carries_that_rules_limit() {
    let c = compile_limits(
        "enforce",
        &[
            "name: grant, from: a, to: b, ports: [{ protocol: TCP, port: 8000, endPort: 9000 }], \
             expires: \"2030-01-01T00:00:00Z\", rateLimit: { connectionsPerSecond: 10 }",
            "name: standing, from: a, to: b, ports: [{ protocol: TCP, port: 8080 }]",
        ],
        &[],
    );
    let at_8080 = lookup(&c, A, B, TCP, 8080).unwrap();
    assert_eq!((at_8080.rule_id, at_8080.limit_id), (2, 0));
    let at_8081 = lookup(&c, A, B, TCP, 8081).unwrap();
    assert_eq!((at_8081.rule_id, at_8081.limit_id), (1, 1));
}

#[test]
fn audit_fallback_entries_carry_no_limit() {
    let c = compile_limits(
        "enforce",
        &[
            "name: trial, from: a, to: b, ports: [{ protocol: TCP, port: 80 }], mode: audit, \
           rateLimit: { packetsPerSecond: 100 }",
        ],
        &[],
    );
    let allowed = lookup(&c, A, B, TCP, 80).unwrap();
    assert_eq!(allowed.flags, RULE_FLAG_ALLOW | RULE_FLAG_AUDIT);
    assert_eq!(allowed.limit_id, 1);
    let fallback = lookup_entry(&c, A, B, UDP, 53).unwrap();
    assert_eq!(fallback.0, RULE_PAIR_PREFIX_BITS);
    assert_eq!(
        (fallback.1.rule_id, fallback.1.flags, fallback.1.limit_id),
        (1, RULE_FLAG_AUDIT, 0)
    );
}

#[test]
fn every_entry_of_an_identity_with_a_quota_carries_it() {
    use tollgate_common::identity::IDENTITY_FLAG_NODE_ADDRESS;
    // 10.0.1.5 is a node address inside a's CIDR, 10.0.2.5 one inside b's (no quota), and
    // 192.168.1.1 and 2001:db8::1 are the node's own (host).
    let host_addrs: Vec<IpAddr> = ["10.0.1.5", "10.0.2.5", "192.168.1.1", "2001:db8::1"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let policy = limits_policy(
        "enforce",
        &["name: r, from: a, to: b, ports: [{ protocol: TCP }], \
           rateLimit: { packetsPerSecond: 5 }"],
        &[
            "identity: c, connectionsPerSecond: 100",
            "identity: host, packetsPerSecond: 1000",
            "identity: a, bytesPerSecond: 1048576",
        ],
    );
    let c = compile_policy(&policy, 0, &CLOCK, &host_addrs);
    let (quota_c, _) = limit_of(&c, &identity_owner("c"));
    let (quota_host, _) = limit_of(&c, &identity_owner("host"));
    let (quota_a, _) = limit_of(&c, &identity_owner("a"));
    assert_eq!((quota_c, quota_host, quota_a), (2, 3, 4));
    let expected = |id: u32| match id {
        A => quota_a,
        C => quota_c,
        IDENTITY_HOST => quota_host,
        _ => 0,
    };
    let v4: Vec<_> = c.identities_v4.iter().map(|(_, _, v)| *v).collect();
    let v6: Vec<_> = c.identities_v6.iter().map(|(_, _, v)| *v).collect();
    for v in v4.iter().chain(&v6) {
        assert_eq!(v.limit_id, expected(v.id), "{v:?}");
    }
    // The kinds of entry that must be there: a's CIDRs (v4 and v6), c's exact addresses, a's
    // node address, b's node address (no quota), host's addresses.
    let has = |entries: &[IdentityValue], id, flags| {
        entries
            .iter()
            .any(|v| v.id == id && v.flags == flags && v.limit_id == expected(id))
    };
    assert!(has(&v4, A, 0) && has(&v6, A, 0));
    assert!(has(&v4, C, 0) && has(&v6, C, 0));
    assert!(has(&v4, A, IDENTITY_FLAG_NODE_ADDRESS));
    assert!(has(&v4, B, IDENTITY_FLAG_NODE_ADDRESS));
    assert!(has(&v4, IDENTITY_HOST, 0) && has(&v6, IDENTITY_HOST, 0));
    let c_exact = c
        .identities_v4
        .iter()
        .find(|(_, k, _)| k.addr == [10, 0, 3, 1])
        .unwrap();
    assert_eq!((c_exact.0, c_exact.2.limit_id), (64, quota_c));
}

#[test]
fn a_node_address_an_identity_lists_itself_keeps_its_quota() {
    // c's own /32 is a node address: one entry, marked, with c's quota.
    let policy = limits_policy("enforce", &[], &["identity: c, packetsPerSecond: 10"]);
    let c = compile_policy(&policy, 0, &CLOCK, &["10.0.3.1".parse().unwrap()]);
    let entries: Vec<_> = c
        .identities_v4
        .iter()
        .filter(|(_, k, _)| k.addr == [10, 0, 3, 1])
        .collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].2.limit_id, 1);
    assert_ne!(
        entries[0].2.flags & tollgate_common::identity::IDENTITY_FLAG_NODE_ADDRESS,
        0
    );
}

#[test]
fn audit_flag_comes_from_the_policy_the_rule_or_the_quota() {
    let rules = [
        "name: quiet, from: a, to: b, ports: [{ protocol: TCP }], \
         rateLimit: { packetsPerSecond: 5 }",
        "name: trial, from: b, to: c, ports: [{ protocol: TCP }], mode: audit, \
         rateLimit: { packetsPerSecond: 5 }",
        "name: strict, from: c, to: a, ports: [{ protocol: TCP }], mode: enforce, \
         rateLimit: { packetsPerSecond: 5 }",
    ];
    let quotas = [
        "identity: a, packetsPerSecond: 5",
        "identity: b, mode: audit, packetsPerSecond: 5",
        "identity: c, mode: enforce, packetsPerSecond: 5",
    ];
    let flags = |c: &CompiledPolicy| -> Vec<u32> { c.limits.iter().map(|l| l.flags).collect() };
    let enforce = compile_limits("enforce", &rules, &quotas);
    assert_eq!(
        flags(&enforce),
        [0, LIMIT_FLAG_AUDIT, 0, 0, LIMIT_FLAG_AUDIT, 0]
    );
    // Policy audit puts every limit in audit; a `mode: enforce` cannot take it out.
    let audit = compile_limits("audit", &rules, &quotas);
    assert_eq!(flags(&audit), [LIMIT_FLAG_AUDIT; 6]);
}

#[test]
fn fingerprints_are_stable_across_compiles_and_unrelated_changes() {
    let login = "name: login, from: a, to: b, ports: [{ protocol: TCP, port: 22 }], \
                 rateLimit: { connectionsPerMinute: 5 }";
    let bulk = "name: bulk, from: b, to: c, ports: [{ protocol: UDP }], \
                rateLimit: { bytesPerSecond: 1048576, burstBytes: 65536 }";
    let quota = "identity: c, connectionsPerSecond: 100, burst: 200";
    let first = compile_limits("enforce", &[login, bulk], &[quota]);
    let again = compile_limits("enforce", &[login, bulk], &[quota]);
    assert_eq!(first.limits, again.limits);
    // Other rules and quotas added, everything reordered: positions move, fingerprints stay.
    let changed = compile_limits(
        "enforce",
        &[
            "name: web, from: world, to: a, ports: [{ protocol: TCP, port: 443 }], \
             rateLimit: { packetsPerSecond: 100 }",
            "name: dns, from: a, to: c, ports: [{ protocol: UDP, port: 53 }]",
            login,
            bulk,
        ],
        &["identity: a, packetsPerSecond: 50", quota],
    );
    for owner in [rule_owner("login"), rule_owner("bulk"), identity_owner("c")] {
        let (before_at, before) = limit_of(&first, &owner);
        let (after_at, after) = limit_of(&changed, &owner);
        assert_eq!(before.fingerprint, after.fingerprint, "{owner}");
        assert_eq!(before, after, "{owner}");
        assert_ne!(
            before_at, after_at,
            "{owner} moved, and its entries follow it"
        );
    }
    assert_eq!(lookup(&changed, A, B, TCP, 22).unwrap().limit_id, 2);
    assert_eq!(lookup(&changed, B, C, UDP, 1).unwrap().limit_id, 3);
}

#[test]
fn fingerprints_change_with_rate_burst_mode_and_owner() {
    let base = "name: login, from: a, to: b, ports: [{ protocol: TCP, port: 22 }], \
                rateLimit: { connectionsPerMinute: 5 }";
    let variants = [
        base.to_owned(),
        // The rate.
        base.replace("connectionsPerMinute: 5", "connectionsPerMinute: 6"),
        // The same count per second.
        base.replace("connectionsPerMinute: 5", "connectionsPerSecond: 5"),
        // The burst.
        base.replace(
            "connectionsPerMinute: 5",
            "connectionsPerMinute: 5, burst: 4",
        ),
        // Another kind.
        base.replace("connectionsPerMinute: 5", "packetsPerMinute: 5"),
        // The mode.
        base.replace("rateLimit", "mode: audit, rateLimit"),
        // The owner.
        base.replace("name: login", "name: ssh"),
    ];
    let fingerprints: Vec<u64> = variants
        .iter()
        .map(|rule| compile_limits("enforce", &[rule], &[]).limits[0].fingerprint)
        .collect();
    for (i, f) in fingerprints.iter().enumerate() {
        for (j, g) in fingerprints.iter().enumerate().skip(i + 1) {
            assert_ne!(f, g, "{} vs {}", variants[i], variants[j]);
        }
    }
    // The policy's mode is the limit's mode too: in an audit policy the limit is the one the
    // rule's own `mode: audit` makes.
    let audit = compile_limits("audit", &[base], &[]).limits[0].fingerprint;
    assert_ne!(audit, fingerprints[0]);
    assert_eq!(audit, fingerprints[5]);
    // A burst written as its default is the same limit.
    let explicit = base.replace(
        "connectionsPerMinute: 5",
        "connectionsPerMinute: 5, burst: 5",
    );
    assert_eq!(
        compile_limits("enforce", &[&explicit], &[]).limits[0].fingerprint,
        fingerprints[0]
    );
}

#[test]
fn quota_fingerprints_name_the_identity_not_its_number() {
    let quota = "identity: b, packetsPerSecond: 5";
    let a_quota = compile_limits("enforce", &[], &["identity: a, packetsPerSecond: 5"]);
    let b_quota = compile_limits("enforce", &[], &[quota]);
    assert_ne!(a_quota.limits[0].fingerprint, b_quota.limits[0].fingerprint);
    // A rule and an identity of the same name are different owners.
    let rule_b = compile_limits(
        "enforce",
        &["name: b, from: a, to: b, ports: [{ protocol: TCP }], \
           rateLimit: { packetsPerSecond: 5 }"],
        &[],
    );
    assert_ne!(rule_b.limits[0].fingerprint, b_quota.limits[0].fingerprint);
    // b declared first instead of second: a different id, the same quota.
    let text = format!(
        "apiVersion: tollgate.dev/v1alpha1\nkind: Policy\nmetadata: {{ name: t }}\nspec:\n  \
         identities:\n    - {{ name: b, cidrs: [10.0.2.0/24] }}\n    - \
         {{ name: a, cidrs: [10.0.1.0/24] }}\n  rateLimits:\n    - {{ {quota} }}\n"
    );
    let reordered = compile_policy(&parse_policy(&text, "t.yaml").unwrap(), 0, &CLOCK, &[]);
    assert_eq!(
        reordered.limits[0].fingerprint,
        b_quota.limits[0].fingerprint
    );
    assert_eq!(identity_v4(&reordered, Ipv4Addr::new(10, 0, 2, 1)), A);
    assert!(reordered
        .identities_v4
        .iter()
        .all(|(_, _, v)| v.limit_id == u32::from(v.id == A)));
}

#[test]
fn limit_owners_display_as_status_names_them() {
    assert_eq!(rule_owner("login").to_string(), "rule login");
    assert_eq!(identity_owner("frontend").to_string(), "identity frontend");
}

#[test]
fn a_limited_rule_decides_the_traffic_it_shares_with_an_unlimited_one() {
    // An earlier rule allows everything between a and b without a limit; the login rule's
    // limit must still apply to port 22 (and nowhere else).
    let c = compile(&[
        "from: a, to: b, ports: [{ protocol: ANY }]",
        "from: a, to: b, ports: [{ port: 22, protocol: TCP }], \
         rateLimit: { connectionsPerMinute: 5 }",
    ]);
    assert_eq!(c.limits.len(), 1);
    assert!(c.limits[0].used);
    let login = lookup(&c, A, B, TCP, 22).expect("an entry for port 22");
    assert_eq!((login.rule_id, login.limit_id), (2, 1));
    let other = lookup(&c, A, B, TCP, 80).expect("an entry for port 80");
    assert_eq!((other.rule_id, other.limit_id), (1, 0));
}

#[test]
fn a_limit_whose_rule_decides_nothing_is_unused() {
    // A longer-lasting rule wins the overlap (a standing rule over a grant): the grant's limit
    // applies to no traffic, and says so instead of taking a bucket.
    let c = compile(&[
        "from: a, to: b, ports: [{ port: 22, protocol: TCP }]",
        "from: a, to: b, ports: [{ port: 22, protocol: TCP }], expires: \"2030-01-01T00:00:00Z\", \
         rateLimit: { connectionsPerMinute: 5 }",
    ]);
    assert_eq!(c.limits.len(), 1);
    assert!(!c.limits[0].used);
    assert_eq!(lookup(&c, A, B, TCP, 22).unwrap().limit_id, 0);
}
