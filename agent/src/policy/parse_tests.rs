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

#[test]
fn authentication_is_refused_until_supported() {
    let text = edit("      # mode: audit\n", "      authentication: mtls\n");
    let line = line_of(&text, "authentication: mtls");
    assert_eq!(
        error(&text).to_string(),
        format!(
            "policy.yaml:{line}: rules[0].authentication: not supported by this version of \
             tollgate yet (planned); remove it"
        )
    );
}

#[test]
fn rule_rate_limit_is_refused_until_supported() {
    let text = edit(
        "      # mode: audit\n",
        "      rateLimit: { packetsPerSecond: 1000, burst: 10 }\n",
    );
    assert_error(
        &text,
        "rules[0].rateLimit",
        line_of(&text, "rateLimit"),
        "not supported",
    );
}

#[test]
fn policy_rate_limits_are_refused_until_supported() {
    let text = format!(
        "{SHOP}  rateLimits:\n    - {{ identity: frontend, connectionsPerSecond: 100, burst: 200 }}\n"
    );
    assert_error(
        &text,
        "rateLimits",
        line_of(&text, "rateLimits:"),
        "not supported",
    );
}

#[test]
fn empty_rate_limits_are_refused_too() {
    let text = format!("{SHOP}  rateLimits: []\n");
    assert_error(
        &text,
        "rateLimits",
        line_of(&text, "rateLimits"),
        "not supported",
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
    // /dev/zero never ends: without a bound the read would exhaust memory.
    let e = load_policy_file(Path::new("/dev/zero")).unwrap_err();
    assert_eq!(e.to_string(), "/dev/zero: the policy is larger than 32 MiB");
}
