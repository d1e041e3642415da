//! Bookkeeping for the control socket's connections, so that idle clients cannot starve it.
//! At most a configured number of connections are served at once; when a new one arrives at
//! the cap, the oldest connection with no request in progress is closed to make room (an idle
//! `nc -U` or a stuck script must not keep `tollgate status` out), and only when every
//! connection is in the middle of a request is the newcomer closed instead.
//!
//! A connection is idle from accept until its request head has been read, and busy from then
//! on: the CLI sends one request per connection and keep-alive is off, so a busy connection
//! never becomes idle again. [`Tracked`] wraps the router to mark that moment, and the
//! idle-to-closing and idle-to-busy transitions are one atomic compare-and-swap each, so a
//! request that has started is never cut off to make room.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use axum::{
    http::{Request, StatusCode},
    response::{IntoResponse as _, Response},
};
use tokio::sync::oneshot;

use crate::wire::ErrorResponse;

/// An error answer, as the API gives them (`api::ApiError` is the same shape).
fn error_response(code: StatusCode, error: String) -> Response {
    (code, axum::Json(ErrorResponse { error })).into_response()
}

const IDLE: u8 = 0;
const BUSY: u8 = 1;
/// Chosen to be closed; its request, if the head arrives now, is refused.
const CLOSING: u8 = 2;

/// The live connections, oldest first.
pub(crate) struct Connections {
    max: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    next_id: u64,
    /// By id, which grows with accept order: the first entry is the oldest connection.
    live: BTreeMap<u64, Slot>,
}

struct Slot {
    activity: Arc<AtomicU8>,
    /// Dropping it tells the connection's task to drop the connection, closing the socket.
    _close: oneshot::Sender<()>,
}

/// A connection's place among [`Connections`]; gives the place up when dropped.
pub(crate) struct Admitted {
    connections: Arc<Connections>,
    id: u64,
    /// Shared with [`Tracked`], which marks the connection busy.
    pub activity: Arc<AtomicU8>,
    /// Resolves (with an error) when the connection was closed to make room.
    pub closed: oneshot::Receiver<()>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.connections.lock().live.remove(&self.id);
    }
}

impl Connections {
    /// `max` connections at once (at least one).
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            inner: Mutex::new(Inner {
                next_id: 0,
                live: BTreeMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here can be left half-done by a panic: each operation is one map update.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes room for a new connection, closing the oldest idle one if at the cap. `None` when
    /// every connection is busy: the caller closes the newcomer.
    pub(crate) fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut inner = self.lock();
        if inner.live.len() >= self.max && !close_oldest_idle(&mut inner) {
            return None;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let activity = Arc::new(AtomicU8::new(IDLE));
        let (close, closed) = oneshot::channel();
        inner.live.insert(
            id,
            Slot {
                activity: activity.clone(),
                _close: close,
            },
        );
        Some(Admitted {
            connections: self.clone(),
            id,
            activity,
            closed,
        })
    }

    /// Closes up to `n` idle connections, oldest first, to free their file descriptors when
    /// accept ran out of them. Returns how many it closed.
    pub(crate) fn close_oldest_idle(&self, n: usize) -> usize {
        let mut inner = self.lock();
        (0..n).take_while(|_| close_oldest_idle(&mut inner)).count()
    }

    /// How many connections are open.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().live.len()
    }
}

fn close_oldest_idle(inner: &mut Inner) -> bool {
    let oldest_idle = inner.live.iter().find_map(|(&id, slot)| {
        slot.activity
            .compare_exchange(IDLE, CLOSING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then_some(id)
    });
    match oldest_idle {
        Some(id) => {
            // Dropping the slot drops its sender, which wakes the connection's task.
            inner.live.remove(&id);
            true
        }
        None => false,
    }
}

/// The router as a hyper service that marks its connection busy when a request head arrives
/// and bounds the request (body, handling) by `request_timeout`.
#[derive(Clone)]
pub(crate) struct Tracked<S> {
    pub inner: S,
    pub activity: Arc<AtomicU8>,
    pub request_timeout: Duration,
}

impl<S, B> hyper::service::Service<Request<B>> for Tracked<S>
where
    S: hyper::service::Service<Request<B>, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        if self
            .activity
            .compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Chosen to make room just before this head arrived; the connection is closing.
            return Box::pin(std::future::ready(Ok(error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "the agent closed this connection to make room for another; retry".to_owned(),
            ))));
        }
        let request_timeout = self.request_timeout;
        let response = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(request_timeout, response).await {
                Ok(response) => response,
                Err(_) => Ok(error_response(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request did not complete within {}",
                        humantime::format_duration(request_timeout)
                    ),
                )),
            }
        })
    }
}

/// Lets through one log line per interval for a recurring event and counts the rest, so that
/// an error that repeats in a tight loop (accept failing with EMFILE) cannot flood the log.
pub(crate) struct LogThrottle {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Records one event at `now`. `Some(n)` when it should be logged, `n` being how many
    /// were not logged since the last one that was; `None` when it should not.
    pub(crate) fn event(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(a: &Admitted) {
        a.activity.store(BUSY, Ordering::Release);
    }

    #[test]
    fn at_the_cap_the_oldest_idle_connection_makes_room() {
        use oneshot::error::TryRecvError;
        let connections = Connections::new(3);
        let mut first = connections.admit().unwrap();
        let mut second = connections.admit().unwrap();
        let mut third = connections.admit().unwrap();
        busy(&first);
        let fourth = connections.admit().expect("an idle connection makes room");
        assert_eq!(connections.len(), 3);
        // The busy first one stays; the second, the oldest idle one, is told to close.
        assert!(matches!(first.closed.try_recv(), Err(TryRecvError::Empty)));
        assert!(matches!(
            second.closed.try_recv(),
            Err(TryRecvError::Closed)
        ));
        assert_eq!(second.activity.load(Ordering::Acquire), CLOSING);
        assert!(matches!(third.closed.try_recv(), Err(TryRecvError::Empty)));
        drop(second); // its task ends; its place was already given up
        assert_eq!(connections.len(), 3);
        drop(fourth);
        assert_eq!(connections.len(), 2);
    }

    #[test]
    fn when_every_connection_is_busy_the_newcomer_is_refused() {
        let connections = Connections::new(2);
        let a = connections.admit().unwrap();
        let b = connections.admit().unwrap();
        busy(&a);
        busy(&b);
        assert!(connections.admit().is_none());
        assert_eq!(connections.close_oldest_idle(4), 0);
        drop(a);
        assert!(connections.admit().is_some());
    }

    #[test]
    fn closing_idle_connections_for_descriptors_spares_busy_ones() {
        let connections = Connections::new(10);
        let all: Vec<_> = (0..5).map(|_| connections.admit().unwrap()).collect();
        busy(&all[0]);
        busy(&all[3]);
        assert_eq!(connections.close_oldest_idle(2), 2);
        let states: Vec<u8> = all
            .iter()
            .map(|a| a.activity.load(Ordering::Acquire))
            .collect();
        assert_eq!(states, [BUSY, CLOSING, CLOSING, BUSY, IDLE]);
        assert_eq!(connections.close_oldest_idle(5), 1);
        assert_eq!(connections.len(), 2);
    }

    #[test]
    fn a_connection_chosen_to_close_cannot_start_a_request() {
        let connections = Connections::new(1);
        let a = connections.admit().unwrap();
        let _b = connections.admit().unwrap();
        // What Tracked::call does when the head arrives.
        assert!(a
            .activity
            .compare_exchange(IDLE, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_err());
    }

    #[test]
    fn throttle_logs_once_per_interval_and_counts_the_rest() {
        let start = Instant::now();
        let s = Duration::from_secs(1);
        let mut throttle = LogThrottle::new(5 * s);
        assert_eq!(throttle.event(start), Some(0));
        for i in 1..=1000 {
            assert_eq!(throttle.event(start + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.event(start + 5 * s), Some(1000));
        assert_eq!(throttle.event(start + 6 * s), None);
        assert_eq!(throttle.event(start + 20 * s), Some(1));
    }
}
