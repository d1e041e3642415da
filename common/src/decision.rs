//! The policy decision for a new flow (or a tracked flow under a new generation), given what the
//! rule lookup found. The kernel calls this for every new flow; `tollgate check` calls it with
//! what it read from the same maps, so both answer alike.

use crate::{
    rule::{RuleId, RuleValue, RULE_FLAG_ALLOW, RULE_FLAG_AUDIT, RULE_ID_NONE},
    time::is_expired,
    verdict::Verdict,
    POLICY_FLAG_AUDIT,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule that decided; `RULE_ID_NONE` for default deny.
    pub rule_id: RuleId,
    /// CLOCK_BOOTTIME expiry the decision carries into conntrack (0 = never).
    pub expires_ns: u64,
}

/// Decides a flow from the most specific rule entry that matched (`None` = no entry), the slot's
/// `POLICY_FLAG_*` and the current CLOCK_BOOTTIME.
///
/// - An allowing entry that has not expired allows.
/// - An expired allowing entry denies (`DenyExpired`), naming the rule.
/// - An audit fallback entry (no `RULE_FLAG_ALLOW`) whose rule has not expired turns the default
///   deny into a would-deny naming that audit rule.
/// - Otherwise the default deny.
///
/// A deny becomes `AuditWouldDeny` when the deciding rule or the policy is in audit mode.
#[inline(always)]
pub fn decide(entry: Option<&RuleValue>, policy_flags: u32, now_ns: u64) -> Decision {
    let policy_audit = policy_flags & POLICY_FLAG_AUDIT != 0;
    let (deny, rule_id, rule_audit) = match entry {
        Some(v) if v.flags & RULE_FLAG_ALLOW != 0 => {
            if !is_expired(v.expires_ns, now_ns) {
                return Decision {
                    verdict: Verdict::AllowNew,
                    rule_id: v.rule_id,
                    expires_ns: v.expires_ns,
                };
            }
            (
                Verdict::DenyExpired,
                v.rule_id,
                v.flags & RULE_FLAG_AUDIT != 0,
            )
        }
        Some(v) if !is_expired(v.expires_ns, now_ns) => (Verdict::DenyDefault, v.rule_id, true),
        _ => (Verdict::DenyDefault, RULE_ID_NONE, false),
    };
    let verdict = if policy_audit || rule_audit {
        Verdict::AuditWouldDeny
    } else {
        deny
    };
    Decision {
        verdict,
        rule_id,
        expires_ns: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::RULE_FLAG_AUDIT;

    fn allow(rule_id: u32, expires_ns: u64, flags: u32) -> RuleValue {
        RuleValue {
            rule_id,
            flags: RULE_FLAG_ALLOW | flags,
            expires_ns,
            ..Default::default()
        }
    }

    #[test]
    fn no_entry_is_default_deny() {
        let d = decide(None, 0, 100);
        assert_eq!((d.verdict, d.rule_id), (Verdict::DenyDefault, RULE_ID_NONE));
    }

    #[test]
    fn no_entry_in_audit_policy_is_would_deny() {
        assert_eq!(
            decide(None, POLICY_FLAG_AUDIT, 100).verdict,
            Verdict::AuditWouldDeny
        );
    }

    #[test]
    fn allowing_entry_allows_and_carries_expiry() {
        let d = decide(Some(&allow(7, 500, 0)), 0, 100);
        assert_eq!(
            d,
            Decision {
                verdict: Verdict::AllowNew,
                rule_id: 7,
                expires_ns: 500
            }
        );
    }

    #[test]
    fn expired_entry_denies_naming_the_rule() {
        let d = decide(Some(&allow(7, 500, 0)), 0, 500);
        assert_eq!((d.verdict, d.rule_id), (Verdict::DenyExpired, 7));
    }

    #[test]
    fn expired_audit_rule_is_would_deny() {
        let d = decide(Some(&allow(7, 500, RULE_FLAG_AUDIT)), 0, 600);
        assert_eq!((d.verdict, d.rule_id), (Verdict::AuditWouldDeny, 7));
    }

    #[test]
    fn audit_fallback_turns_default_deny_into_would_deny() {
        let fallback = RuleValue {
            rule_id: 9,
            flags: RULE_FLAG_AUDIT,
            ..Default::default()
        };
        let d = decide(Some(&fallback), 0, 100);
        assert_eq!((d.verdict, d.rule_id), (Verdict::AuditWouldDeny, 9));
    }

    #[test]
    fn expired_audit_fallback_is_plain_default_deny() {
        let fallback = RuleValue {
            rule_id: 9,
            flags: RULE_FLAG_AUDIT,
            expires_ns: 50,
            ..Default::default()
        };
        let d = decide(Some(&fallback), 0, 100);
        assert_eq!((d.verdict, d.rule_id), (Verdict::DenyDefault, RULE_ID_NONE));
    }

    #[test]
    fn never_expiring_rule_allows_forever() {
        assert_eq!(
            decide(Some(&allow(1, 0, 0)), 0, u64::MAX).verdict,
            Verdict::AllowNew
        );
    }
}
