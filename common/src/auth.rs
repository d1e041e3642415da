//! Authentication of identity pairs (`authentication: mtls` rules).
//!
//! `TG_AUTH` is a hash keyed by the identity pair's *pair key*: 64 bits of SHA-256 over the two
//! SPIFFE IDs (source, then destination), which the agent's compiler also writes into every
//! rule entry that requires authentication (`RuleValue::auth_pair`). An entry says that the
//! agents of the two identities' nodes completed a mutual TLS handshake presenting the SVIDs of
//! both identities, and until when that proof holds (CLOCK_BOOTTIME). Keyed by SPIFFE IDs, not
//! by the per-generation identity numbers, a proof stays valid across policy swaps and agent
//! restarts, and means nothing to a pair with other SPIFFE IDs. (A collision of two pairs'
//! keys needs 2^32 pairs for even odds; a policy has at most a few thousand.)
//!
//! A rule that requires authentication admits a flow only while a valid entry for its pair
//! exists. The flow then carries the earlier of the rule's and the entry's expiry, so the
//! datapath decides it again when the proof lapses: a renewed entry readmits it, a missing one
//! cuts it. Revoking an entry before its expiry (a certificate replaced by one of another
//! SPIFFE ID, or no longer trusted) is followed by a generation swap, which makes every tracked
//! flow be decided again at its next packet.
//!
//! An entry without an expiry is never valid: a proof must lapse by itself if the agent dies.

use crate::{
    decision::Decision,
    rule::{RULE_FLAG_AUDIT, RULE_FLAG_AUTH_MTLS},
    time::{earliest, NEVER},
    verdict::Verdict,
    POLICY_FLAG_AUDIT,
};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AuthKey {
    /// The pair key of (source SPIFFE ID, destination SPIFFE ID); never 0.
    pub pair: u64,
}
const _: () = assert!(core::mem::size_of::<AuthKey>() == 8);

/// `RuleValue::auth_pair` of a rule that needs no authentication.
pub const NO_PAIR: u64 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthValue {
    /// CLOCK_BOOTTIME nanoseconds after which the proof no longer holds; never `NEVER`.
    pub expires_ns: u64,
    /// Reserved for `AUTH_FLAG_*`; 0.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AuthValue>() == 16);

/// What a decision found about authentication, reported by `tollgate check` and in events.
pub mod state {
    /// The deciding rule does not require authentication (or nothing allows the flow).
    pub const NOT_REQUIRED: u32 = 0;
    /// Required, and a valid entry admits the pair.
    pub const VALID: u32 = 1;
    /// Required, and no entry exists for the pair.
    pub const MISSING: u32 = 2;
    /// Required, and the pair's entry has expired.
    pub const EXPIRED: u32 = 3;

    /// Stable names for the CLI and JSON.
    pub const fn name(state: u32) -> &'static str {
        match state {
            NOT_REQUIRED => "not-required",
            VALID => "valid",
            MISSING => "missing",
            EXPIRED => "expired",
            _ => "unknown",
        }
    }
}

/// Does the rule entry whose flags are `rule_flags` require authentication?
#[inline(always)]
pub const fn requires_auth(rule_flags: u32) -> bool {
    rule_flags & RULE_FLAG_AUTH_MTLS != 0
}

/// Applies the authentication gate to a policy decision (`decide`'s result for the rule entry
/// whose flags are `rule_flags`): an allowed flow of a rule that requires authentication stays
/// allowed only with a valid `entry` for its pair, and then carries the earlier of the two
/// expiries. Without one it is denied as `DenyAuthRequired` naming the rule, or a would-deny
/// when the rule or the policy is in audit mode. Returns the decision and the `state::*`.
#[inline(always)]
pub fn authorize(
    d: Decision,
    rule_flags: u32,
    policy_flags: u32,
    entry: Option<&AuthValue>,
    now_ns: u64,
) -> (Decision, u32) {
    if d.verdict != Verdict::AllowNew || !requires_auth(rule_flags) {
        return (d, state::NOT_REQUIRED);
    }
    let state = match entry {
        None => state::MISSING,
        Some(v) if v.expires_ns == NEVER || now_ns >= v.expires_ns => state::EXPIRED,
        Some(v) => {
            return (
                Decision {
                    expires_ns: earliest(d.expires_ns, v.expires_ns),
                    ..d
                },
                state::VALID,
            )
        }
    };
    let audit = rule_flags & RULE_FLAG_AUDIT != 0 || policy_flags & POLICY_FLAG_AUDIT != 0;
    (
        Decision {
            verdict: if audit {
                Verdict::AuditWouldDeny
            } else {
                Verdict::DenyAuthRequired
            },
            rule_id: d.rule_id,
            expires_ns: 0,
        },
        state,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::RULE_ID_NONE;

    const AUTH: u32 = RULE_FLAG_AUTH_MTLS;

    fn allowed(expires_ns: u64) -> Decision {
        Decision {
            verdict: Verdict::AllowNew,
            rule_id: 7,
            expires_ns,
        }
    }

    fn entry(expires_ns: u64) -> AuthValue {
        AuthValue {
            expires_ns,
            ..Default::default()
        }
    }

    #[test]
    fn rule_without_authentication_is_untouched() {
        let (d, s) = authorize(allowed(0), 0, 0, None, 100);
        assert_eq!((d, s), (allowed(0), state::NOT_REQUIRED));
    }

    #[test]
    fn a_deny_stays_a_deny_whatever_the_entry() {
        let deny = Decision {
            verdict: Verdict::DenyDefault,
            rule_id: RULE_ID_NONE,
            expires_ns: 0,
        };
        let (d, s) = authorize(deny, AUTH, 0, Some(&entry(1_000)), 100);
        assert_eq!((d, s), (deny, state::NOT_REQUIRED));
    }

    #[test]
    fn missing_entry_denies_naming_the_rule() {
        let (d, s) = authorize(allowed(0), AUTH, 0, None, 100);
        assert_eq!(
            (d.verdict, d.rule_id, s),
            (Verdict::DenyAuthRequired, 7, state::MISSING)
        );
        assert!(!d.verdict.passes());
    }

    #[test]
    fn expired_entry_denies() {
        let (d, s) = authorize(allowed(0), AUTH, 0, Some(&entry(100)), 100);
        assert_eq!((d.verdict, s), (Verdict::DenyAuthRequired, state::EXPIRED));
    }

    #[test]
    fn entry_without_expiry_is_never_valid() {
        let (d, s) = authorize(allowed(0), AUTH, 0, Some(&entry(NEVER)), 100);
        assert_eq!((d.verdict, s), (Verdict::DenyAuthRequired, state::EXPIRED));
    }

    #[test]
    fn valid_entry_admits_with_its_expiry() {
        let (d, s) = authorize(allowed(0), AUTH, 0, Some(&entry(500)), 100);
        assert_eq!(
            (d.verdict, d.expires_ns, s),
            (Verdict::AllowNew, 500, state::VALID)
        );
    }

    #[test]
    fn flow_carries_the_earlier_of_rule_and_entry_expiry() {
        let (d, _) = authorize(allowed(300), AUTH, 0, Some(&entry(500)), 100);
        assert_eq!(d.expires_ns, 300);
        let (d, _) = authorize(allowed(900), AUTH, 0, Some(&entry(500)), 100);
        assert_eq!(d.expires_ns, 500);
    }

    #[test]
    fn audit_rule_or_policy_makes_it_a_would_deny() {
        let (d, _) = authorize(allowed(0), AUTH | RULE_FLAG_AUDIT, 0, None, 100);
        assert_eq!(d.verdict, Verdict::AuditWouldDeny);
        let (d, _) = authorize(allowed(0), AUTH, POLICY_FLAG_AUDIT, None, 100);
        assert_eq!((d.verdict, d.rule_id), (Verdict::AuditWouldDeny, 7));
    }
}
