//! Verdicts: the reason a packet passed or was dropped. They index the per-CPU counter array
//! `TG_COUNTERS` and appear in events.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// A new flow admitted by a rule.
    AllowNew = 0,
    /// A packet of a tracked flow (either direction) still allowed.
    AllowEstablished = 1,
    /// No rule allows the flow.
    DenyDefault = 2,
    /// The rule that would allow it has expired.
    DenyExpired = 3,
    /// A tracked flow whose authorisation lapsed after a policy change or expiry.
    DenyRevoked = 4,
    /// Would have been denied, passed because of audit mode.
    AuditWouldDeny = 5,
    /// An IP packet that could not be parsed (truncated, bad lengths, too many extension
    /// headers).
    DropMalformed = 6,
    /// A non-first IP fragment: it carries no ports and cannot be matched.
    DropFragment = 7,
    /// Not IP (ARP, LLDP, ...), or IPv6 neighbour discovery: passed without policy.
    PassNonIp = 8,
    /// No policy is loaded yet (generation 0): everything IP is denied.
    DenyNoPolicy = 9,
    /// The source address may not be sent from the interface the packet arrived on: the route
    /// back to it leaves by another interface (reverse-path check), or the interface is bound to
    /// an identity the address does not belong to.
    DropSpoofed = 10,
    /// Over a rate limit: a packet over a packets or bytes limit, or a new connection over a
    /// connections limit (refused: no conntrack entry is made).
    DropRateLimited = 11,
    /// Would have been dropped by a rate limit in audit mode; passed.
    AuditWouldDrop = 12,
    /// The rule that allows the flow requires mutual-TLS authentication of the identity pair,
    /// and no valid proof exists (yet): the flow is refused and the agent is told to run the
    /// handshake, so the client's retry can pass.
    DenyAuthRequired = 13,
}

pub const VERDICT_COUNT: u32 = 14;

impl Verdict {
    pub const ALL: [Verdict; VERDICT_COUNT as usize] = [
        Verdict::AllowNew,
        Verdict::AllowEstablished,
        Verdict::DenyDefault,
        Verdict::DenyExpired,
        Verdict::DenyRevoked,
        Verdict::AuditWouldDeny,
        Verdict::DropMalformed,
        Verdict::DropFragment,
        Verdict::PassNonIp,
        Verdict::DenyNoPolicy,
        Verdict::DropSpoofed,
        Verdict::DropRateLimited,
        Verdict::AuditWouldDrop,
        Verdict::DenyAuthRequired,
    ];

    /// Does the packet pass?
    #[inline(always)]
    pub const fn passes(self) -> bool {
        matches!(
            self,
            Verdict::AllowNew
                | Verdict::AllowEstablished
                | Verdict::AuditWouldDeny
                | Verdict::AuditWouldDrop
                | Verdict::PassNonIp
        )
    }

    /// Stable snake_case name used in the CLI, JSON and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::AllowNew => "allow_new",
            Verdict::AllowEstablished => "allow_established",
            Verdict::DenyDefault => "deny_default",
            Verdict::DenyExpired => "deny_expired",
            Verdict::DenyRevoked => "deny_revoked",
            Verdict::AuditWouldDeny => "audit_would_deny",
            Verdict::DropMalformed => "drop_malformed",
            Verdict::DropFragment => "drop_fragment",
            Verdict::PassNonIp => "pass_non_ip",
            Verdict::DenyNoPolicy => "deny_no_policy",
            Verdict::DropSpoofed => "drop_spoofed",
            Verdict::DropRateLimited => "drop_rate_limited",
            Verdict::AuditWouldDrop => "audit_would_drop",
            Verdict::DenyAuthRequired => "deny_auth_required",
        }
    }

    pub const fn from_u32(v: u32) -> Option<Verdict> {
        if v < VERDICT_COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }
}

/// `TG_COUNTERS` is a per-CPU array: one packet counter per verdict, then the counters below.
pub const COUNTER_EVENTS_LOST: u32 = VERDICT_COUNT;
/// Deny events the sampler held back (see `sampler`); exact, unlike the per-event counts.
pub const COUNTER_EVENTS_SUPPRESSED: u32 = VERDICT_COUNT + 1;
/// Number of entries in `TG_COUNTERS`.
pub const COUNTER_SLOTS: u32 = VERDICT_COUNT + 2;
