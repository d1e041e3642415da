//! Parsing and validation: what is accepted, and that every rejection names the right field and
//! line. Most cases edit one line of the design document's example policy.

use std::time::SystemTime;

use super::*;

/// DESIGN.md's example, without the fields this version refuses.
const SHOP: &str = r#"apiVersion: tollgate.dev/v1alpha1
kind: Policy
metadata:
  name: shop
spec:
  mode: enforce                      # or audit
  identities:
    - name: frontend
      spiffeId: spiffe://shop.test/ns/shop/sa/frontend   # needed for rules with authentication
      cidrs: ["10.10.1.0/24", "fd00:10:1::/64"]
    - name: orders
      cidrs: ["10.10.2.10/32"]
  rules:
    - name: frontend-to-orders
      from: frontend                 # identity name, or world / host
      to: orders
      ports:
        - { port: 8080, protocol: TCP }
        - { port: 9000, endPort: 9100, protocol: UDP }
        - { protocol: ICMP }
      # mode: audit
      # expires: "2026-12-01T10:00:00Z"
"#;

/// SHOP with `from` replaced by `to`, which must occur exactly once.
fn edit(from: &str, to: &str) -> String {
    assert_eq!(
        SHOP.matches(from).count(),
        1,
        "{from:?} must occur once in SHOP"
    );
    SHOP.replacen(from, to, 1)
}

/// SHOP with more rules appended (indented as list items of `rules`).
fn with_rules(rules: &str) -> String {
    format!("{SHOP}{rules}")
}

/// The 1-based line of the only line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let lines: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(lines.len(), 1, "{needle:?} must be on exactly one line");
    lines[0]
}

fn error(text: &str) -> PolicyError {
    match parse_policy(text, "policy.yaml") {
        Ok(p) => panic!("expected an error, got {p:#?}"),
        Err(e) => e,
    }
}

fn parse(text: &str) -> Policy {
    parse_policy(text, "policy.yaml").unwrap_or_else(|e| panic!("{e}"))
}

/// Asserts the error's field and line, and that its message contains `message`.
#[track_caller]
fn assert_error(text: &str, field: &str, line: usize, message: &str) {
    let e = error(text);
    assert_eq!(e.field.as_deref(), Some(field), "field of: {e}");
    assert_eq!(e.line, Some(line), "line of: {e}");
    assert!(
        e.message.contains(message),
        "{e:?} should mention {message:?}"
    );
}

#[test]
fn design_example_parses() {
    let p = parse(SHOP);
    assert_eq!(p.name, "shop");
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.source_text, SHOP);
    assert_eq!(p.identities.len(), 2);
    assert_eq!(p.identities[0].name, "frontend");
    assert_eq!(
        p.identities[0].spiffe_id.as_deref(),
        Some("spiffe://shop.test/ns/shop/sa/frontend")
    );
    let cidrs: Vec<String> = p.identities[0]
        .cidrs
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(cidrs, ["10.10.1.0/24", "fd00:10:1::/64"]);
    let rule = &p.rules[0];
    assert_eq!(
        (rule.name.as_str(), rule.from.as_str(), rule.to.as_str()),
        ("frontend-to-orders", "frontend", "orders")
    );
    assert_eq!((rule.mode, rule.expires), (None, None));
    assert_eq!(
        rule.ports,
        [
            PortSpec {
                protocol: Protocol::Tcp,
                port: Some(8080),
                end_port: None
            },
            PortSpec {
                protocol: Protocol::Udp,
                port: Some(9000),
                end_port: Some(9100)
            },
            PortSpec {
                protocol: Protocol::Icmp,
                port: None,
                end_port: None
            },
        ]
    );
}

#[test]
fn mode_defaults_to_enforce() {
    let p = parse(&edit(
        "  mode: enforce                      # or audit\n",
        "",
    ));
    assert_eq!(p.mode, Mode::Enforce);
}

#[test]
fn audit_modes_are_read() {
    let p =
        parse(&edit("  mode: enforce ", "  mode: audit ").replace("# mode: audit", "mode: audit"));
    assert_eq!(p.mode, Mode::Audit);
    assert_eq!(p.rules[0].mode, Some(Mode::Audit));
}

#[test]
fn unknown_identity_names_field_line_and_known_identities() {
    let text = with_rules(
        "    - name: orders-to-frontend
      from: orders
      to: frontend
      ports: [{ protocol: TCP }]
    - name: frontend-to-ordrs
      from: frontend
      to: ordrs
      ports: [{ protocol: TCP, port: 80 }]
",
    );
    let line = line_of(&text, "to: ordrs");
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{line}: rules[2].to: unknown identity \"ordrs\" \
             (known: frontend, orders, host, world)"
        )
    );
}

#[test]
fn reserved_identities_are_valid_rule_endpoints() {
    let p = parse(&with_rules(
        "    - { name: in, from: world, to: host, ports: [{ protocol: TCP, port: 22 }] }\n",
    ));
    assert_eq!(
        (p.rules[1].from.as_str(), p.rules[1].to.as_str()),
        ("world", "host")
    );
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let text = edit(
        "      to: orders\n",
        "      to: orders\n      too: orders\n",
    );
    let line = line_of(&text, "too: orders");
    let e = error(&text);
    assert_eq!(e.field.as_deref(), Some("rules[0].too"));
    assert_eq!(e.line, Some(line));
    assert!(
        e.to_string().starts_with(&format!(
            "policy.yaml:{line}: rules[0].too: unknown field `too`, expected one of"
        )),
        "{e}"
    );
}

#[test]
fn repeated_field_is_named_with_its_line() {
    let text = edit(
        "      to: orders\n",
        "      to: orders\n      to: frontend\n",
    );
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{}: rules[0].to: duplicate field `to`",
            line_of(&text, "to: frontend")
        )
    );
}

#[test]
fn anchors_and_aliases_are_read_as_copies() {
    let p =
        parse(
            &with_rules("    - { name: back, from: orders, to: frontend, ports: *web }\n")
                .replacen("      ports:\n", "      ports: &web\n", 1),
        );
    assert_eq!(p.rules[1].ports, p.rules[0].ports);
}

#[test]
fn unknown_top_level_field_is_named() {
    let text = format!("{SHOP}status: {{}}\n");
    assert_error(
        &text,
        "status",
        line_of(&text, "status:"),
        "unknown field `status`",
    );
}

#[test]
fn wrong_value_type_is_reported_at_the_value() {
    let text = edit("port: 8080,", "port: [8080],");
    assert_error(
        &text,
        "rules[0].ports[0].port",
        line_of(&text, "[8080]"),
        "expected an integer",
    );
}

#[test]
fn duplicate_identity_name_is_rejected() {
    let text = edit("    - name: orders\n", "    - name: frontend\n");
    let line = line_of(&text, "cidrs: [\"10.10.2.10/32\"]") - 1;
    // The rule to "orders" is a second error.
    assert_eq!(
        error(&text).without_more(),
        format!(
            "policy.yaml:{line}: identities[1].name: duplicate identity name \"frontend\" \
             (first declared at identities[0])"
        )
    );
}

#[test]
fn duplicate_rule_name_is_rejected() {
    let text = with_rules(
        "    - { name: frontend-to-orders, from: frontend, to: orders, ports: [{ protocol: UDP }] }\n",
    );
    let line = line_of(&text, "ports: [{ protocol: UDP }]");
    assert_error(
        &text,
        "rules[1].name",
        line,
        "duplicate rule name \"frontend-to-orders\"",
    );
}

#[test]
fn overlapping_cidrs_across_identities_name_both() {
    let text = edit(
        "[\"10.10.2.10/32\"]",
        "[\"10.10.2.10/32\", \"10.10.1.128/25\"]",
    );
    let line = line_of(&text, "10.10.1.128/25");
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{line}: identities[1].cidrs[1]: 10.10.1.128/25 of identity \"orders\" \
             overlaps 10.10.1.0/24 of identity \"frontend\" (identities[0].cidrs[0]); an address \
             may belong to at most one identity"
        )
    );
}

#[test]
fn equal_ipv6_cidrs_across_identities_overlap() {
    let text = edit(
        "[\"10.10.2.10/32\"]",
        "[\"10.10.2.10/32\", \"fd00:10:1::/64\"]",
    );
    assert_error(
        &text,
        "identities[1].cidrs[1]",
        line_of(&text, "10.10.2.10/32"),
        "overlaps fd00:10:1::/64 of identity \"frontend\"",
    );
}

#[test]
fn wider_cidr_declared_later_is_reported_as_the_overlap() {
    let text = edit("[\"10.10.2.10/32\"]", "[\"10.10.0.0/16\"]");
    assert_error(
        &text,
        "identities[1].cidrs[0]",
        line_of(&text, "10.10.0.0/16"),
        "10.10.0.0/16 of identity \"orders\" overlaps 10.10.1.0/24 of identity \"frontend\"",
    );
}

#[test]
fn overlap_within_one_identity_is_allowed() {
    let p = parse(&edit(
        "[\"10.10.2.10/32\"]",
        "[\"10.10.2.0/24\", \"10.10.2.10/32\", \"10.10.2.0/24\"]",
    ));
    assert_eq!(p.identities[1].cidrs.len(), 3);
}

#[test]
fn adjacent_cidrs_of_different_identities_do_not_overlap() {
    parse(&edit(
        "[\"10.10.2.10/32\"]",
        "[\"10.10.0.0/24\", \"10.10.2.0/23\"]",
    ));
}

#[test]
fn cidr_with_host_bits_suggests_the_network() {
    let text = edit("\"10.10.1.0/24\"", "\"10.10.1.5/24\"");
    let line = line_of(&text, "10.10.1.5/24");
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{line}: identities[0].cidrs[0]: 10.10.1.5/24 has host bits set; did you \
             mean 10.10.1.0/24?"
        )
    );
}

#[test]
fn bare_address_is_one_host() {
    let p = parse(&edit(
        "[\"10.10.2.10/32\"]",
        "[\"10.10.2.10\", \"fd00:20::1\"]",
    ));
    let cidrs: Vec<String> = p.identities[1]
        .cidrs
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(cidrs, ["10.10.2.10/32", "fd00:20::1/128"]);
}

#[test]
fn malformed_cidr_is_rejected() {
    let text = edit("\"10.10.2.10/32\"", "\"10.10.2.10/33\"");
    assert_error(
        &text,
        "identities[1].cidrs[0]",
        line_of(&text, "/33"),
        "is not a CIDR",
    );
}

#[test]
fn empty_cidrs_are_rejected() {
    let text = edit("[\"10.10.2.10/32\"]", "[]");
    assert_error(
        &text,
        "identities[1].cidrs",
        line_of(&text, "cidrs: []"),
        "at least one",
    );
}

#[test]
fn missing_cidrs_are_reported_at_the_identity() {
    let text = edit(
        "    - name: orders\n      cidrs: [\"10.10.2.10/32\"]\n",
        "    - name: orders\n",
    );
    assert_error(
        &text,
        "identities[1].cidrs",
        line_of(&text, "name: orders"),
        "required",
    );
}

#[test]
fn reserved_identity_name_cannot_be_declared() {
    let text = edit("    - name: orders\n", "    - name: world\n");
    assert_error(
        &text,
        "identities[1].name",
        line_of(&text, "name: world"),
        "reserved",
    );
}

#[test]
fn identity_name_must_be_a_dns_label() {
    let text = edit("    - name: orders\n", "    - name: Orders\n");
    assert_error(
        &text,
        "identities[1].name",
        line_of(&text, "name: Orders"),
        "not a valid name",
    );
}

#[test]
fn spiffe_id_needs_a_trust_domain() {
    let text = edit(
        "spiffe://shop.test/ns/shop/sa/frontend",
        "spiffe:///ns/shop",
    );
    assert_error(
        &text,
        "identities[0].spiffeId",
        line_of(&text, "spiffeId"),
        "trust domain",
    );
}

#[test]
fn end_port_below_port_is_rejected() {
    let text = edit("endPort: 9100", "endPort: 8999");
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{}: rules[0].ports[1].endPort: endPort 8999 is below port 9000; a range \
             runs from port to endPort",
            line_of(&text, "8999")
        )
    );
}

#[test]
fn end_port_without_port_is_rejected() {
    let text = edit("port: 9000, endPort: 9100", "endPort: 9100");
    assert_error(
        &text,
        "rules[0].ports[1].endPort",
        line_of(&text, "endPort"),
        "requires port",
    );
}

#[test]
fn end_port_equal_to_port_is_one_port() {
    let p = parse(&edit("endPort: 9100", "endPort: 9000"));
    assert_eq!(p.rules[0].ports[1].port_range(), (9000, 9000));
}

#[test]
fn port_on_icmp_is_rejected() {
    let text = edit("{ protocol: ICMP }", "{ protocol: ICMP, port: 8 }");
    assert_error(
        &text,
        "rules[0].ports[2].port",
        line_of(&text, "port: 8 "),
        "not allowed with protocol ICMP",
    );
}

#[test]
fn port_on_any_is_rejected() {
    let text = edit("{ protocol: ICMP }", "{ protocol: any, port: 80 }");
    assert_error(
        &text,
        "rules[0].ports[2].port",
        line_of(&text, "any"),
        "not allowed with protocol ANY",
    );
}

#[test]
fn port_zero_is_rejected() {
    let text = edit("port: 8080,", "port: 0,");
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{}: rules[0].ports[0].port: 0 is out of range; ports are 1 to 65535 \
             (leave port out to allow every port)",
            line_of(&text, "port: 0,")
        )
    );
}

#[test]
fn port_above_65535_is_rejected() {
    let text = edit("endPort: 9100", "endPort: 65536");
    assert_error(
        &text,
        "rules[0].ports[1].endPort",
        line_of(&text, "65536"),
        "out of range",
    );
}

#[test]
fn unknown_protocol_is_rejected() {
    let text = edit("protocol: TCP", "protocol: SCTP");
    assert_error(
        &text,
        "rules[0].ports[0].protocol",
        line_of(&text, "SCTP"),
        "unknown protocol \"SCTP\"",
    );
}

#[test]
fn protocol_names_ignore_case() {
    let text = edit("protocol: TCP", "protocol: tcp").replace("protocol: ICMP", "protocol: icmpV6");
    let p = parse(&text);
    assert_eq!(p.rules[0].ports[0].protocol, Protocol::Tcp);
    assert_eq!(p.rules[0].ports[2].protocol, Protocol::IcmpV6);
}

#[test]
fn missing_protocol_is_rejected() {
    let text = edit("{ port: 8080, protocol: TCP }", "{ port: 8080 }");
    assert_error(
        &text,
        "rules[0].ports[0].protocol",
        line_of(&text, "{ port: 8080 }"),
        "required",
    );
}

#[test]
fn empty_ports_are_rejected() {
    let text = with_rules("    - { name: nothing, from: world, to: orders, ports: [] }\n");
    assert_error(
        &text,
        "rules[1].ports",
        line_of(&text, "nothing"),
        "at least one",
    );
}

#[test]
fn expiry_is_read_as_utc() {
    let p = parse(&edit("# expires: ", "expires: "));
    let expected = humantime::parse_rfc3339("2026-12-01T10:00:00Z").unwrap();
    assert_eq!(p.rules[0].expires, Some(expected));
    assert!(p.rules[0].expires.unwrap() > SystemTime::UNIX_EPOCH);
}

#[test]
fn malformed_expiry_is_rejected() {
    let text = edit(
        "# expires: \"2026-12-01T10:00:00Z\"",
        "expires: \"next tuesday\"",
    );
    assert_error(
        &text,
        "rules[0].expires",
        line_of(&text, "next tuesday"),
        "not an RFC 3339 timestamp",
    );
}

#[test]
fn unknown_rule_mode_is_rejected() {
    let text = edit("# mode: audit", "mode: permissive");
    assert_error(
        &text,
        "rules[0].mode",
        line_of(&text, "permissive"),
        "expected enforce or audit",
    );
}

#[test]
fn wrong_api_version_is_rejected() {
    let text = edit("tollgate.dev/v1alpha1", "tollgate.dev/v1");
    assert_eq!(
        error(&text).to_string(),
        "policy.yaml:1: apiVersion: unsupported value \"tollgate.dev/v1\"; expected \
         \"tollgate.dev/v1alpha1\""
    );
}

#[test]
fn wrong_kind_is_rejected() {
    let text = edit("kind: Policy", "kind: NetworkPolicy");
    assert_error(&text, "kind", 2, "expected \"Policy\"");
}

#[test]
fn missing_policy_name_is_rejected() {
    let text = edit("  name: shop\n", "  name:\n");
    assert_error(&text, "metadata.name", 4, "required");
}

/// SHOP with `orders` given a SPIFFE ID and the rule `authentication: mtls`.
fn with_mtls() -> String {
    edit(
        "      cidrs: [\"10.10.2.10/32\"]\n",
        "      spiffeId: spiffe://shop.test/ns/shop/sa/orders\n      authAddress: \"10.200.0.2:7443\"\n      cidrs: [\"10.10.2.10/32\"]\n",
    )
    .replacen("      # mode: audit\n", "      authentication: mtls\n", 1)
}

#[test]
fn mtls_rule_between_identities_with_spiffe_ids_is_read() {
    let p = parse(&with_mtls());
    assert_eq!(p.rules[0].authentication, Some(Authentication::Mtls));
    assert_eq!(
        p.identities[1].auth_address,
        Some("10.200.0.2:7443".parse().unwrap())
    );
    assert_eq!(p.identities[0].auth_address, None);
}

#[test]
fn unknown_authentication_is_named() {
    let text = with_mtls().replace("authentication: mtls", "authentication: tls");
    let line = line_of(&text, "authentication: tls");
    assert_error(&text, "rules[0].authentication", line, "expected mtls");
}

#[test]
fn mtls_needs_a_spiffe_id_on_both_identities() {
    let text = edit("      # mode: audit\n", "      authentication: mtls\n");
    let line = line_of(&text, "authentication: mtls");
    assert_error(
        &text,
        "rules[0].authentication",
        line,
        "identity \"orders\" (to) has no spiffeId",
    );
}

#[test]
fn mtls_with_world_is_refused() {
    let text = with_mtls().replacen("      from: frontend ", "      from: world ", 1);
    let line = line_of(&text, "authentication: mtls");
    assert_error(
        &text,
        "rules[0].authentication",
        line,
        "from is \"world\", which has no certificate",
    );
}

#[test]
fn auth_address_must_be_an_address_and_port() {
    for bad in ["10.200.0.2", "node-b:7443", "0.0.0.0:7443", "10.200.0.2:0"] {
        let text = with_mtls().replace("\"10.200.0.2:7443\"", &format!("\"{bad}\""));
        let line = line_of(&text, "authAddress");
        assert_error(
            &text,
            "identities[1].authAddress",
            line,
            "is not an address and port",
        );
    }
}

#[test]
fn auth_address_needs_a_spiffe_id() {
    let text = edit(
        "      cidrs: [\"10.10.2.10/32\"]\n",
        "      authAddress: \"[fd00:200::2]:7443\"\n      cidrs: [\"10.10.2.10/32\"]\n",
    );
    let line = line_of(&text, "authAddress");
    assert_error(&text, "identities[1].authAddress", line, "needs spiffeId");
}

/// SHOP with `rate_limit` (a flow mapping's contents) as the rule's `rateLimit`.
fn with_rule_limit(rate_limit: &str) -> String {
    edit(
        "      # mode: audit\n",
        &format!("      rateLimit: {{ {rate_limit} }}\n"),
    )
}

/// SHOP with `spec.rateLimits` listing `quotas` (flow mappings' contents, one per line).
fn with_quotas(quotas: &[&str]) -> String {
    let mut text = format!("{SHOP}  rateLimits:\n");
    for quota in quotas {
        text.push_str(&format!("    - {{ {quota} }}\n"));
    }
    text
}

/// The error of a rule's `rateLimit` written as `rate_limit`: the field under
/// `rules[0].rateLimit` it names, and that it is on the rateLimit's line.
#[track_caller]
fn assert_rule_limit_error(rate_limit: &str, field: &str, message: &str) {
    let text = with_rule_limit(rate_limit);
    let field = match field {
        "" => "rules[0].rateLimit".to_owned(),
        f => format!("rules[0].rateLimit.{f}"),
    };
    assert_error(&text, &field, line_of(&text, "rateLimit:"), message);
}

fn rate(count: u64, per: Per) -> Option<Rate> {
    Some(Rate { count, per })
}

const SEC_NS: u64 = 1_000_000_000;

#[test]
fn design_rate_limit_examples_are_accepted() {
    let text = with_quotas(&["identity: frontend, connectionsPerSecond: 100, burst: 200"]).replace(
        "      # mode: audit\n",
        "      rateLimit: { packetsPerSecond: 1000, bytesPerSecond: 1048576, \
         connectionsPerSecond: 5, burst: 10 }\n",
    );
    let p = parse(&text);
    let limit = p.rules[0].rate_limit.clone().expect("the rule's rateLimit");
    assert_eq!(
        limit,
        RateLimit {
            packets: rate(1000, Per::Second),
            bytes: rate(1_048_576, Per::Second),
            connections: rate(5, Per::Second),
            burst: Some(10),
            burst_bytes: None,
        }
    );
    let kind = |count, burst| {
        Some(KindLimit {
            count,
            period_ns: SEC_NS,
            burst,
        })
    };
    // `burst` is the packets' and the connections'; bytes default to one second's worth.
    assert_eq!(
        limit.kinds(),
        [kind(1000, 10), kind(1_048_576, 1_048_576), kind(5, 10)]
    );
    assert_eq!(
        limit.describe(),
        "1000 packets/s (burst 10), 1048576 bytes/s (burst 1048576), 5 connections/s (burst 10)"
    );
    assert_eq!(
        p.rate_limits,
        [IdentityQuota {
            identity: "frontend".to_owned(),
            mode: None,
            limit: RateLimit {
                connections: rate(100, Per::Second),
                burst: Some(200),
                ..Default::default()
            },
        }]
    );
}

#[test]
fn rules_without_rate_limit_have_none() {
    let p = parse(SHOP);
    assert_eq!(p.rules[0].rate_limit, None);
    assert!(p.rate_limits.is_empty());
    assert!(parse(&format!("{SHOP}  rateLimits: []\n"))
        .rate_limits
        .is_empty());
}

#[test]
fn per_minute_forms_and_default_bursts() {
    let p = parse(&with_rule_limit(
        "connectionsPerMinute: 5, packetsPerMinute: 600, bytesPerMinute: 6000000",
    ));
    let limit = p.rules[0].rate_limit.clone().unwrap();
    assert_eq!(limit.connections, rate(5, Per::Minute));
    assert_eq!(limit.packets, rate(600, Per::Minute));
    assert_eq!(limit.bytes, rate(6_000_000, Per::Minute));
    let per_minute = |count| {
        Some(KindLimit {
            count,
            period_ns: 60 * SEC_NS,
            burst: count,
        })
    };
    assert_eq!(
        limit.kinds(),
        [per_minute(600), per_minute(6_000_000), per_minute(5)]
    );
    assert_eq!(
        limit.describe(),
        "600 packets/min (burst 600), 6000000 bytes/min (burst 6000000), 5 connections/min \
         (burst 5)"
    );
    assert_eq!(Per::Second.ns(), SEC_NS);
    assert_eq!(Per::Minute.ns(), 60 * SEC_NS);
}

#[test]
fn each_kind_defaults_its_burst_to_its_own_count() {
    let p = parse(&with_rule_limit(
        "packetsPerSecond: 1000, connectionsPerMinute: 5, bytesPerSecond: 2048, burstBytes: 9000",
    ));
    let kinds = p.rules[0].rate_limit.as_ref().unwrap().kinds();
    let bursts: Vec<u64> = kinds.iter().map(|k| k.unwrap().burst).collect();
    assert_eq!(bursts, [1000, 9000, 5]);
    let p = parse(&with_rule_limit("bytesPerSecond: 1048576"));
    let kinds = p.rules[0].rate_limit.as_ref().unwrap().kinds();
    assert_eq!(kinds[0], None);
    assert_eq!(kinds[1].unwrap().burst, 1_048_576);
    assert_eq!(kinds[2], None);
}

#[test]
fn rate_limit_fields_may_be_written_in_block_style() {
    let text = edit(
        "      # mode: audit\n",
        "      rateLimit:\n        connectionsPerMinute: 5\n        burst: 0\n",
    );
    assert_error(
        &text,
        "rules[0].rateLimit.burst",
        line_of(&text, "burst: 0"),
        "at least 1",
    );
    let p = parse(&text.replace("burst: 0", "burst: 3"));
    assert_eq!(p.rules[0].rate_limit.as_ref().unwrap().burst, Some(3));
}

#[test]
fn zero_rate_is_rejected() {
    let text = with_rule_limit("connectionsPerMinute: 0");
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{}: rules[0].rateLimit.connectionsPerMinute: must be at least 1; to \
             allow none of this traffic, remove the rule",
            line_of(&text, "rateLimit")
        )
    );
}

#[test]
fn negative_rate_is_rejected() {
    assert_rule_limit_error(
        "packetsPerSecond: -5",
        "packetsPerSecond",
        "-5 is negative; a rate counts packets per second, at least 1",
    );
}

#[test]
fn non_integer_rate_is_rejected_by_type() {
    assert_rule_limit_error(
        "bytesPerSecond: 1.5",
        "bytesPerSecond",
        "invalid type: floating point `1.5`, expected an integer",
    );
    assert_rule_limit_error(
        "bytesPerSecond: 1MB",
        "bytesPerSecond",
        "invalid type: string \"1MB\", expected an integer",
    );
    assert_rule_limit_error(
        "burst: \"10\", packetsPerSecond: 5",
        "burst",
        "expected an integer",
    );
}

#[test]
fn rate_limit_without_a_rate_is_rejected() {
    for written in ["burst: 10", ""] {
        assert_rule_limit_error(
            written,
            "",
            "no rate given; set at least one of packetsPerSecond",
        );
    }
    for empty in ["rateLimit:\n", "rateLimit: null\n"] {
        let text = edit("# mode: audit\n", empty);
        assert_error(
            &text,
            "rules[0].rateLimit",
            line_of(&text, "rateLimit"),
            "empty; set at least one of",
        );
    }
}

#[test]
fn both_forms_of_one_kind_are_rejected() {
    assert_rule_limit_error(
        "packetsPerSecond: 10, packetsPerMinute: 600",
        "packetsPerMinute",
        "packetsPerSecond is given too; packets have one rate, per second or per minute",
    );
    assert_rule_limit_error(
        "connectionsPerMinute: 5, connectionsPerSecond: 1",
        "connectionsPerMinute",
        "connectionsPerSecond is given too",
    );
}

#[test]
fn rates_beyond_their_bounds_are_rejected() {
    for (field, bad, good, message) in [
        (
            "packetsPerSecond",
            1_000_000_001u64,
            1_000_000_000u64,
            "at most 1000000000 is accepted",
        ),
        (
            "packetsPerMinute",
            60_000_000_001,
            60_000_000_000,
            "at most 60000000000 is accepted",
        ),
        (
            "bytesPerSecond",
            1_000_000_000_001,
            1_000_000_000_000,
            "1000000000001 bytes per second is more than any node carries",
        ),
        (
            "bytesPerMinute",
            60_000_000_000_001,
            60_000_000_000_000,
            "at most 60000000000000 is accepted",
        ),
        (
            "bytesPerSecond",
            1023,
            1024,
            "1023 bytes per second is below 1 KiB/s, at which no TCP connection works; at least \
             1024 is accepted",
        ),
        (
            "bytesPerMinute",
            61_439,
            61_440,
            "at least 61440 is accepted",
        ),
        (
            "connectionsPerSecond",
            10_000_001,
            10_000_000,
            "at most 10000000 is accepted",
        ),
        (
            "connectionsPerMinute",
            600_000_001,
            600_000_000,
            "at most 600000000 is accepted",
        ),
    ] {
        assert_rule_limit_error(&format!("{field}: {bad}"), field, message);
        parse(&with_rule_limit(&format!("{field}: {good}")));
    }
}

#[test]
fn zero_or_negative_bursts_are_rejected() {
    assert_rule_limit_error(
        "packetsPerSecond: 10, burst: 0",
        "burst",
        "0 is not a burst; it is how much may pass at once from a full bucket, at least 1",
    );
    assert_rule_limit_error(
        "packetsPerSecond: 10, burst: -3",
        "burst",
        "-3 is not a burst",
    );
    assert_rule_limit_error(
        "bytesPerSecond: 2048, burstBytes: 0",
        "burstBytes",
        "0 is not a burst",
    );
}

#[test]
fn burst_longer_than_an_hour_of_its_rate_is_rejected() {
    assert_rule_limit_error(
        "connectionsPerMinute: 5, burst: 1000",
        "burst",
        "burst 1000 at 5 connections per minute is 200 minutes of traffic; at most one hour's \
         worth (300) is accepted",
    );
    let p = parse(&with_rule_limit("connectionsPerMinute: 5, burst: 300"));
    assert_eq!(p.rules[0].rate_limit.as_ref().unwrap().burst, Some(300));
    assert_rule_limit_error(
        "packetsPerSecond: 1, burst: 3601",
        "burst",
        "burst 3601 at 1 packet per second is 3601 seconds of traffic; at most one hour's \
         worth (3600) is accepted",
    );
    assert_rule_limit_error(
        "bytesPerSecond: 1024, burstBytes: 4000000",
        "burstBytes",
        "burstBytes 4000000 at 1024 bytes per second is 3906.2 seconds of traffic; at most \
         one hour's worth (3686400) is accepted",
    );
    parse(&with_rule_limit(
        "bytesPerSecond: 1024, burstBytes: 3686400",
    ));
}

#[test]
fn a_shared_burst_is_checked_against_each_kind() {
    // 1000 is a second of packets but 200 minutes of connections.
    assert_rule_limit_error(
        "packetsPerSecond: 1000, connectionsPerMinute: 5, burst: 1000",
        "burst",
        "at 5 connections per minute is 200 minutes",
    );
}

#[test]
fn burst_of_the_wrong_kind_is_rejected() {
    assert_rule_limit_error(
        "bytesPerSecond: 1048576, burst: 10",
        "burst",
        "burst applies to packets and connections, and this limit has neither; use burstBytes \
         for bytes",
    );
    assert_rule_limit_error(
        "packetsPerSecond: 1000, burstBytes: 10",
        "burstBytes",
        "burstBytes applies to bytes, and this limit has no byte rate; use burst for packets \
         and connections",
    );
}

#[test]
fn unknown_rate_limit_field_is_named() {
    assert_rule_limit_error(
        "packetsPerSec: 10",
        "packetsPerSec",
        "unknown field `packetsPerSec`, expected one of `packetsPerSecond`, \
         `packetsPerMinute`, `bytesPerSecond`, `bytesPerMinute`, `connectionsPerSecond`, \
         `connectionsPerMinute`, `burst`, `burstBytes`",
    );
}

#[test]
fn every_problem_of_a_rate_limit_is_reported() {
    let e = error(&with_rule_limit(
        "packetsPerSecond: 0, bytesPerSecond: 10, connectionsPerSecond: -1, burstBytes: 0",
    ));
    let fields: Vec<_> = e.all().map(|e| e.field.clone().unwrap()).collect();
    assert_eq!(
        fields,
        [
            "rules[0].rateLimit.packetsPerSecond",
            "rules[0].rateLimit.bytesPerSecond",
            "rules[0].rateLimit.connectionsPerSecond",
            "rules[0].rateLimit.burstBytes",
        ]
    );
}

#[test]
fn quota_of_an_unknown_identity_lists_the_known_ones() {
    let text = with_quotas(&["identity: fronted, connectionsPerSecond: 100"]);
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{}: rateLimits[0].identity: unknown identity \"fronted\" (known: \
             frontend, orders, host)",
            line_of(&text, "fronted")
        )
    );
}

#[test]
fn quota_of_world_is_rejected() {
    let text = with_quotas(&["identity: world, packetsPerSecond: 100"]);
    assert_error(
        &text,
        "rateLimits[0].identity",
        line_of(&text, "identity: world"),
        "world has no addresses to meter by (it is every address no identity claims); to limit \
         traffic from world, give the rules from world a rateLimit",
    );
}

#[test]
fn quota_of_host_is_accepted() {
    let p = parse(&with_quotas(&["identity: host, bytesPerMinute: 600000000"]));
    assert_eq!(p.rate_limits[0].identity, "host");
    assert_eq!(p.rate_limits[0].limit.bytes, rate(600_000_000, Per::Minute));
}

#[test]
fn second_quota_for_an_identity_names_the_first() {
    let text = with_quotas(&[
        "identity: frontend, connectionsPerSecond: 100",
        "identity: orders, packetsPerSecond: 100",
        "identity: frontend, packetsPerSecond: 5",
    ]);
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{}: rateLimits[2].identity: identity \"frontend\" already has a quota \
             (rateLimits[0]); an identity has one quota",
            line_of(&text, "packetsPerSecond: 5")
        )
    );
}

#[test]
fn quota_needs_an_identity() {
    let text = with_quotas(&["connectionsPerSecond: 100"]);
    assert_error(
        &text,
        "rateLimits[0].identity",
        line_of(&text, "connectionsPerSecond: 100"),
        "required",
    );
}

#[test]
fn quota_rates_are_validated_like_a_rules() {
    let text = with_quotas(&["identity: orders, connectionsPerMinute: 0"]);
    assert_error(
        &text,
        "rateLimits[0].connectionsPerMinute",
        line_of(&text, "identity: orders"),
        "must be at least 1; to let the identity send none of this traffic, remove the rules \
         that allow it",
    );
    let text = with_quotas(&["identity: orders"]);
    assert_error(
        &text,
        "rateLimits[0]",
        line_of(&text, "identity: orders"),
        "no rate given",
    );
    let text = with_quotas(&["identity: orders, connectionsPerMinute: 5, burst: 1000"]);
    assert_error(
        &text,
        "rateLimits[0].burst",
        line_of(&text, "identity: orders"),
        "is 200 minutes of traffic",
    );
    let text = with_quotas(&["identity: orders, rateLimit: { packetsPerSecond: 5 }"]);
    assert_error(
        &text,
        "rateLimits[0].rateLimit",
        line_of(&text, "identity: orders"),
        "unknown field `rateLimit`, expected one of `identity`, `mode`, `packetsPerSecond`",
    );
}

#[test]
fn quota_mode_is_read() {
    let p = parse(&with_quotas(&[
        "identity: orders, mode: audit, packetsPerSecond: 5",
        "identity: frontend, mode: enforce, packetsPerSecond: 5",
    ]));
    assert_eq!(p.rate_limits[0].mode, Some(Mode::Audit));
    assert_eq!(p.rate_limits[1].mode, Some(Mode::Enforce));
    let text = with_quotas(&["identity: orders, mode: dry-run, packetsPerSecond: 5"]);
    assert_error(
        &text,
        "rateLimits[0].mode",
        line_of(&text, "dry-run"),
        "expected enforce or audit",
    );
}

#[test]
fn empty_file_is_rejected() {
    for text in ["", "\n\n", "# nothing here\n"] {
        let e = error(text);
        assert_eq!(
            e.to_string(),
            "policy.yaml: the policy is empty; expected a document with apiVersion: \
             tollgate.dev/v1alpha1, kind: Policy, metadata and spec"
        );
    }
}

#[test]
fn non_mapping_document_is_rejected() {
    let e = error("just some words\n");
    assert_eq!(e.line, Some(1));
    assert!(e.message.contains("expected a mapping"), "{e}");
}

#[test]
fn yaml_syntax_error_has_a_line() {
    let text = edit("      to: orders\n", "      to: orders\n     ports: []\n");
    let e = error(&text);
    assert_eq!(e.line, Some(line_of(&text, "     ports: []")), "{e}");
    assert_eq!(e.field, None);
    assert!(e.message.starts_with("did not find expected"), "{e}");
}

#[test]
fn several_errors_are_all_kept_in_file_order() {
    let text = edit("kind: Policy", "kind: Poliyc").replace("protocol: TCP", "protocol: TPC");
    let e = error(&text);
    assert!(e.to_string().ends_with(" (and 1 more)"), "{e}");
    let fields: Vec<_> = e.all().map(|e| e.field.clone().unwrap()).collect();
    assert_eq!(fields, ["kind", "rules[0].ports[0].protocol"]);
    assert!(!e.without_more().contains("more"));
}

#[test]
fn load_names_an_unreadable_file() {
    let e = load_policy_file(Path::new("/nonexistent/policy.yaml")).unwrap_err();
    assert_eq!(e.source_name, "/nonexistent/policy.yaml");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/policy.yaml: cannot read the policy: "),
        "{e}"
    );
}

#[test]
fn load_reads_and_parses_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shop.yaml");
    std::fs::write(&path, edit("kind: Policy", "kind: Nope")).unwrap();
    let e = load_policy_file(&path).unwrap_err();
    assert_eq!(e.source_name, path.display().to_string());
    std::fs::write(&path, SHOP).unwrap();
    assert_eq!(load_policy_file(&path).unwrap().name, "shop");
}

#[test]
fn protocol_numbers_and_names() {
    assert_eq!(Protocol::Tcp.number(), 6);
    assert_eq!(Protocol::Udp.number(), 17);
    assert_eq!(Protocol::Icmp.number(), 1);
    assert_eq!(Protocol::IcmpV6.number(), 58);
    assert_eq!(Protocol::Any.number(), 0);
    assert_eq!(Protocol::parse("IcMpV6"), Some(Protocol::IcmpV6));
    assert_eq!(Protocol::IcmpV6.name(), "ICMPv6");
    assert_eq!(Protocol::parse("gre"), None);
}

#[test]
fn shipped_examples_parse() {
    for (name, text) in [
        ("shop.yaml", include_str!("../../../examples/shop.yaml")),
        (
            "jit-grant.yaml",
            include_str!("../../../examples/jit-grant.yaml"),
        ),
        (
            "audit-rollout.yaml",
            include_str!("../../../examples/audit-rollout.yaml"),
        ),
    ] {
        parse_policy(text, name).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn leading_byte_order_mark_is_dropped() {
    // Without a BOM-aware reader, serde_yaml saw "more than one document" or a string "---".
    for prefix in ["", "---\n", "# written on Windows\n"] {
        let text = format!("{prefix}{SHOP}");
        let p = parse(&format!("\u{feff}{text}"));
        assert_eq!(p.name, "shop");
        assert_eq!(p.source_text, text, "source_text keeps no BOM");
    }
    // Errors still point at the right lines.
    let text = edit("kind: Policy", "kind: Nope");
    assert_error(&format!("\u{feff}{text}"), "kind", 2, "expected \"Policy\"");
}

#[test]
fn owned_text_becomes_the_source_text_without_its_byte_order_mark() {
    let p = parse_policy_owned(format!("\u{feff}{SHOP}"), "policy.yaml").unwrap();
    assert_eq!(p.source_text, SHOP);
    let e = parse_policy_owned(
        format!("\u{feff}{}", edit("kind: Policy", "kind: Nope")),
        "p",
    )
    .unwrap_err();
    assert_eq!(e.line, Some(2));
}

#[test]
fn deep_flow_nesting_is_refused_before_yaml_parsing() {
    // serde_yaml took tens of seconds over this; the nesting check answers at once.
    let e = error(&"[".repeat(100_000));
    assert_eq!(
        e.to_string(),
        "policy.yaml:1: the policy nests deeper than 32 levels"
    );
    let text = format!("{SHOP}  extra: {}\n", "[".repeat(100_000));
    let e = error(&text);
    assert_eq!(e.line, Some(line_of(&text, "extra:")));
    assert_eq!(e.field, None);
    assert_eq!(e.message, "the policy nests deeper than 32 levels");
}

#[test]
fn brackets_in_comments_and_quoted_strings_are_not_nesting() {
    let deep = "[".repeat(100);
    let p = parse(&edit("# or audit", &format!("# or audit {deep}")));
    assert_eq!(p.name, "shop");
    // Validation, not the nesting check, answers for a quoted string full of brackets, in
    // block and in flow context.
    let text = edit(
        "# expires: \"2026-12-01T10:00:00Z\"",
        &format!("expires: \"{deep}\""),
    );
    assert_error(
        &text,
        "rules[0].expires",
        line_of(&text, "expires:"),
        "not an RFC 3339 timestamp",
    );
    let text = edit(
        "[\"10.10.2.10/32\"]",
        &format!("[\"10.10.2.10/32\", '{deep}']"),
    );
    assert_error(
        &text,
        "identities[1].cidrs[1]",
        line_of(&text, &deep),
        "is not an IP address or CIDR",
    );
}

#[test]
fn policy_over_the_size_limit_is_refused() {
    let mut text = String::from(SHOP);
    text.push('#');
    text.push_str(&" ".repeat(MAX_POLICY_BYTES + 1 - text.len()));
    assert_eq!(text.len(), MAX_POLICY_BYTES + 1);
    assert_eq!(
        error(&text).to_string(),
        "policy.yaml: the policy is larger than 32 MiB"
    );
}

#[test]
fn load_reads_at_most_the_size_limit() {
    // A sparse file larger than the limit: read up to the bound, not whole.
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(MAX_POLICY_BYTES as u64 + 4096)
        .unwrap();
    let e = load_policy_file(&big).unwrap_err();
    assert!(
        e.to_string()
            .ends_with("big.yaml: the policy is larger than 32 MiB"),
        "{e}"
    );
    // /dev/zero never ends: the CLI (which reads pipes too) stops at the bound.
    let e = load_policy_file(Path::new("/dev/zero")).unwrap_err();
    assert_eq!(e.to_string(), "/dev/zero: the policy is larger than 32 MiB");
    // The agent's --policy file must be a regular file: a FIFO would block its start.
    let e = crate::policy::read_policy_text(Path::new("/dev/zero")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "/dev/zero: cannot read the policy: not a regular file"
    );
}
