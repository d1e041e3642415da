//! The process's open-file limit. The agent holds a descriptor per control connection, pinned
//! map and program, attached link and event ring; the usual default soft limit of 1,024 is a
//! compatibility default for programs that still use select(2), which the agent does not, so it
//! raises its soft limit to the hard limit at start.

use std::io;

/// RLIMIT_NOFILE's soft limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub before: libc::rlim_t,
    pub after: libc::rlim_t,
}

impl NofileLimit {
    pub fn raised(&self) -> bool {
        self.after > self.before
    }
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (no privilege needed) and says
/// what it was and is.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live, writable local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads one `rlimit` through a pointer to a live local; a soft limit
        // up to the hard limit is always permitted.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(NofileLimit {
        before,
        after: limit.rlim_cur,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_limit_ends_at_the_hard_limit() {
        let limit = raise_nofile_limit().unwrap();
        assert!(limit.after >= limit.before);
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in raise_nofile_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
        assert_eq!(now.rlim_cur, now.rlim_max);
        assert_eq!(now.rlim_cur, limit.after);
        // A second call finds nothing to do.
        let again = raise_nofile_limit().unwrap();
        assert_eq!(
            (again.before, again.after, again.raised()),
            (now.rlim_cur, now.rlim_cur, false)
        );
    }
}
