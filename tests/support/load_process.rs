//! Connection load from processes of their own: this test binary started again inside a
//! workload's namespace, running only the test that asked for it. That test's first call,
//! [`offer_load_if_asked`], finds the load in the environment, offers it, prints the report
//! line and exits, so the rest of the test never runs there. Threads of one process would not
//! show that a limit holds against senders the kernel schedules independently, each with its
//! own sockets, as an identity's pods are.

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use tollgate_testbed::{
    offered::{offer_connections, ConnectionLoad, Offered},
    NetNs,
};

/// The load (`ConnectionLoad::to_spec`) a process started by `LoadProcess` offers.
const LOAD_ENV: &str = "TOLLGATE_TEST_CONNECTION_LOAD";

/// The first line of a test that starts `LoadProcess`es: in such a process, offers the load,
/// prints the report and exits; in the test itself, returns at once.
pub fn offer_load_if_asked() {
    let Ok(spec) = std::env::var(LOAD_ENV) else {
        return;
    };
    match ConnectionLoad::from_spec(&spec).and_then(|load| offer_connections(&load)) {
        Ok(offered) => {
            println!("{}", offered.to_line());
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("load process: {e:#}");
            std::process::exit(1);
        }
    }
}

/// A load process; Drop kills it by pid if it is still running.
pub struct LoadProcess {
    child: Option<Child>,
}

impl LoadProcess {
    /// Starts this binary inside `ns`, running only `test` (which must begin with
    /// `offer_load_if_asked`), to offer `load`.
    pub fn start(ns: &NetNs, test: &str, load: &ConnectionLoad) -> LoadProcess {
        let exe = std::env::current_exe().expect("the test binary's own path");
        let child = ns
            .command_inside(&exe)
            .expect("command in namespace")
            .args([
                test,
                "--exact",
                "--nocapture",
                "--test-threads=1",
                "--quiet",
            ])
            .env(LOAD_ENV, load.to_spec())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting a load process");
        LoadProcess { child: Some(child) }
    }

    /// Waits (at most `timeout`) for the process to finish and returns its report.
    pub fn wait(mut self, timeout: Duration) -> Offered {
        let mut child = self.child.take().expect("not waited for yet");
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "load process {} still running after {timeout:?}",
                    child.id()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The process has exited: its few lines of output are in the pipes.
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "load process failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Offered::from_output(&stdout).unwrap()
    }
}

impl Drop for LoadProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill signals our own unreaped child by its pid.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
