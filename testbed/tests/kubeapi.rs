//! The fake Kubernetes API server against the real `kube` 5 client and runtime watcher: paged
//! lists, watch event order, bookmarks, 410 and relists, 403 messages, an outage and recovery,
//! a dynamic watch of the `tollgate.dev` Policy, typed k8s-openapi objects, selectors, bad
//! requests, and stopping. No root needed; every test is bounded by `TEST_TIMEOUT`.

use std::{
    future::Future,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    api::{
        Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, VersionMatch, WatchEvent,
        WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Client, Config, ResourceExt as _,
};
use serde_json::{json, Value};
use tollgate_testbed::kubeapi::{namespace, pod, policy, FakeApiServer, Options, Request};

const TEST_TIMEOUT: Duration = Duration::from_secs(40);
/// One event the test waits for.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

fn start() -> FakeApiServer {
    start_with(Options::default())
}

fn start_with(options: Options) -> FakeApiServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
    FakeApiServer::start_with(listener, options).expect("start the fake API server")
}

async fn client(server: &FakeApiServer) -> Client {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("kubeconfig");
    server
        .write_kubeconfig(&path)
        .expect("write the kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("kube reads the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube accepts the kubeconfig");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    Client::try_from(config).expect("a kube client")
}

async fn bounded<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(TEST_TIMEOUT, future).await {
        Ok(output) => output,
        Err(_) => panic!("{what}: not done within {TEST_TIMEOUT:?}"),
    }
}

async fn next<S: Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    match tokio::time::timeout(EVENT_TIMEOUT, stream.next()).await {
        Ok(Some(item)) => item,
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: nothing within {EVENT_TIMEOUT:?}"),
    }
}

/// The next watcher event, skipping errors (returned separately).
async fn next_event<K, S>(stream: &mut S, errors: &mut Vec<String>, what: &str) -> Event<K>
where
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
{
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "{what}: only errors: {errors:?}");
        match next(stream, what).await {
            Ok(event) => return event,
            Err(error) => errors.push(error.to_string()),
        }
    }
}

/// Init, the InitApply objects, InitDone.
async fn initial_list<K, S>(stream: &mut S, errors: &mut Vec<String>) -> Vec<K>
where
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Unpin,
{
    let mut objects = Vec::new();
    let mut started = false;
    for _ in 0..100_000 {
        match next_event(stream, errors, "the initial list").await {
            Event::Init => {
                assert!(!started, "Init twice");
                started = true;
            }
            Event::InitApply(object) if started => objects.push(object),
            Event::InitDone if started => return objects,
            _ => panic!("unexpected event during the initial list"),
        }
    }
    panic!("no InitDone after 100000 events");
}

/// Polls a watcher (which only starts its watch when polled) until the server has a watch
/// open; the watcher must yield nothing meanwhile.
async fn until_watching<S: Stream + Unpin>(server: &FakeApiServer, stream: &mut S) {
    for _ in 0..500 {
        if server.counters().open_watches > 0 {
            return;
        }
        let item = tokio::time::timeout(Duration::from_millis(20), stream.next()).await;
        assert!(
            item.is_err(),
            "the watcher yielded something before watching"
        );
    }
    panic!("the watcher never watched");
}

fn web_pod(ns: &str, name: &str, phase: &str) -> Value {
    pod(
        ns,
        name,
        &[("app", "web")],
        "web",
        "node-a",
        &["10.1.0.5"],
        phase,
        false,
    )
}

fn watches(requests: &[Request]) -> Vec<&Request> {
    requests.iter().filter(|r| r.watch).collect()
}

fn lists(requests: &[Request]) -> Vec<&Request> {
    requests.iter().filter(|r| r.is_list()).collect()
}

#[tokio::test]
async fn lists_page_over_the_limit_and_the_watcher_reads_every_page() {
    let server = start();
    for i in 0..1203 {
        let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        let name = format!("pod-{i:04}");
        let pod = pod(
            &format!("ns{}", i % 3),
            &name,
            &[],
            "default",
            "n",
            &[&ip],
            "Running",
            false,
        );
        server.apply(pod).unwrap();
    }
    let client = client(&server).await;
    let pods: Api<Pod> = Api::all(client.clone());
    bounded("paging", async {
        let first = pods.list(&ListParams::default().limit(500)).await.unwrap();
        assert_eq!(first.items.len(), 500);
        assert_eq!(first.metadata.remaining_item_count, Some(703));
        let snapshot = first.metadata.resource_version.clone().unwrap();
        assert_eq!(snapshot, server.resource_version().to_string());
        // Pages are a consistent snapshot: later changes do not show.
        server.apply(web_pod("ns0", "zzz-late", "Running")).unwrap();
        server
            .delete("pods", Some("ns2"), "pod-1202")
            .unwrap()
            .unwrap();
        let token = first.metadata.continue_.clone().unwrap();
        let second = pods
            .list(&ListParams::default().limit(500).continue_token(&token))
            .await
            .unwrap();
        let token = second.metadata.continue_.clone().unwrap();
        let third = pods
            .list(&ListParams::default().limit(500).continue_token(&token))
            .await
            .unwrap();
        assert_eq!((second.items.len(), third.items.len()), (500, 203));
        assert_eq!(third.metadata.continue_, None);
        for page in [&second, &third] {
            assert_eq!(page.metadata.resource_version.as_ref(), Some(&snapshot));
        }
        let names: Vec<String> = [first, second, third]
            .into_iter()
            .flat_map(|page| page.items)
            .map(|pod| format!("{}/{}", pod.namespace().unwrap(), pod.name_any()))
            .collect();
        assert_eq!(names.len(), 1203);
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert!(names.contains(&"ns2/pod-1202".to_owned()));
        assert!(!names.contains(&"ns0/zzz-late".to_owned()));
    })
    .await;

    server.clear_requests();
    let mut stream = watcher::watcher(Api::<Pod>::all(client), watcher::Config::default()).boxed();
    let mut errors = Vec::new();
    let objects = bounded("the watcher's list", initial_list(&mut stream, &mut errors)).await;
    assert_eq!(objects.len(), 1203, "1203 + zzz-late - pod-1202");
    server.apply(web_pod("ns1", "after", "Pending")).unwrap();
    match bounded("an Apply", next_event(&mut stream, &mut errors, "Apply")).await {
        Event::Apply(pod) => assert_eq!(pod.name_any(), "after"),
        _ => panic!("expected Apply"),
    }
    assert!(errors.is_empty(), "{errors:?}");
    let requests = server.requests();
    let lists = lists(&requests);
    assert_eq!(lists.len(), 3, "{lists:?}");
    for (i, list) in lists.iter().enumerate() {
        assert_eq!(list.path, "/api/v1/pods");
        assert_eq!(list.param("limit"), Some("500"));
        assert_eq!(list.param("continue").is_some(), i > 0);
        assert_eq!(list.param("resourceVersion"), None);
    }
    let watch = watches(&requests)[0];
    assert_eq!(watch.path, "/api/v1/pods");
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(watch.param("timeoutSeconds"), Some("290"));
    assert_eq!(
        watch.param("resourceVersion"),
        Some((server.resource_version() - 1).to_string().as_str())
    );
}

#[tokio::test]
async fn the_watcher_sees_added_modified_deleted_in_order() {
    let server = start();
    server.apply(web_pod("prod", "before", "Running")).unwrap();
    server
        .apply(web_pod("dev", "elsewhere", "Running"))
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&server).await, "prod");
    let mut stream = watcher::watcher(pods, watcher::Config::default()).boxed();
    let mut errors = Vec::new();
    let initial = bounded("list", initial_list(&mut stream, &mut errors)).await;
    assert_eq!(
        initial.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["before"]
    );

    server.apply(web_pod("prod", "web-1", "Pending")).unwrap();
    server.apply(web_pod("dev", "not-mine", "Pending")).unwrap();
    server.apply(web_pod("prod", "web-1", "Running")).unwrap();
    let deleted = server
        .delete("Pod", Some("prod"), "web-1")
        .unwrap()
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = bounded("events", next_event(&mut stream, &mut errors, "event")).await;
        seen.push(match event {
            Event::Apply(p) => format!(
                "apply {} {} rv {}",
                p.name_any(),
                p.status.as_ref().unwrap().phase.as_ref().unwrap(),
                p.resource_version().unwrap()
            ),
            Event::Delete(p) => format!(
                "delete {} rv {}",
                p.name_any(),
                p.resource_version().unwrap()
            ),
            _ => panic!("unexpected event"),
        });
    }
    let rv = server.resource_version();
    assert_eq!(
        seen,
        [
            format!("apply web-1 Pending rv {}", rv - 3),
            format!("apply web-1 Running rv {}", rv - 1),
            format!("delete web-1 rv {rv}"),
        ]
    );
    assert_eq!(deleted["metadata"]["resourceVersion"], rv.to_string());
    assert!(errors.is_empty(), "{errors:?}");
    let requests = server.requests();
    assert!(requests
        .iter()
        .all(|r| r.path == "/api/v1/namespaces/prod/pods"));
}

#[tokio::test]
async fn raw_watch_sends_event_types_and_selector_transitions() {
    let server = start();
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    let unscheduled = pod(
        "prod",
        "b",
        &[("app", "web")],
        "web",
        "",
        &[],
        "Pending",
        false,
    );
    server.apply(unscheduled).unwrap();
    let pods: Api<Pod> = Api::all(client(&server).await);
    let params = WatchParams::default()
        .fields("spec.nodeName=node-a")
        .labels("app in (web,db),!canary")
        .disable_bookmarks()
        .timeout(20);
    let mut events = bounded("watch", pods.watch(&params, "0"))
        .await
        .unwrap()
        .boxed();
    let mut log = Vec::new();
    let mut expect = |event: Result<WatchEvent<Pod>, kube::Error>| {
        log.push(match event.unwrap() {
            WatchEvent::Added(p) => format!("ADDED {}", p.name_any()),
            WatchEvent::Modified(p) => format!("MODIFIED {}", p.name_any()),
            WatchEvent::Deleted(p) => format!("DELETED {}", p.name_any()),
            other => panic!("unexpected {other:?}"),
        });
    };
    // From "0": the current state as synthetic ADDED events.
    expect(next(&mut events, "initial").await);
    // b is scheduled onto node-a: it starts matching, so ADDED.
    server.apply(web_pod("prod", "b", "Running")).unwrap();
    expect(next(&mut events, "b scheduled").await);
    // a changes and still matches: MODIFIED.
    server.apply(web_pod("prod", "a", "Succeeded")).unwrap();
    expect(next(&mut events, "a modified").await);
    // a becomes a canary: it stops matching, so DELETED.
    let mut canary = web_pod("prod", "a", "Succeeded");
    canary["metadata"]["labels"]["canary"] = json!("yes");
    server.apply(canary).unwrap();
    expect(next(&mut events, "a canary").await);
    // A pod on another node: nothing.
    let other = pod(
        "prod",
        "c",
        &[("app", "db")],
        "db",
        "node-b",
        &[],
        "Running",
        false,
    );
    server.apply(other).unwrap();
    server.delete("pods", Some("prod"), "b").unwrap();
    expect(next(&mut events, "b deleted").await);
    assert_eq!(
        log,
        ["ADDED a", "ADDED b", "MODIFIED a", "DELETED a", "DELETED b"]
    );

    let listed = pods
        .list(&ListParams::default().fields("spec.nodeName=node-b"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let listed = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(
        listed.items.len(),
        1,
        "only the canary a is left with app=web"
    );
    let error = pods
        .list(&ListParams::default().fields("spec.foo=bar"))
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("field label not supported: spec.foo"),
        "{error}"
    );
    let error = pods
        .list(&ListParams::default().labels("app in ("))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, kube::Error::Api(s) if s.code == 400),
        "{error}"
    );
}

#[tokio::test]
async fn bookmarks_arrive_with_the_current_resource_version_only() {
    let server = start();
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    let pods: Api<Pod> = Api::all(client(&server).await);
    let rv = server.resource_version().to_string();
    let params = WatchParams::default().timeout(20);
    let mut events = bounded("watch", pods.watch(&params, &rv))
        .await
        .unwrap()
        .boxed();
    // Other resources move the global resourceVersion; the bookmark carries it.
    server.apply(namespace("other", &[])).unwrap();
    let started = Instant::now();
    match next(&mut events, "bookmark").await.unwrap() {
        WatchEvent::Bookmark(bookmark) => {
            assert_eq!(bookmark.types.kind, "Pod");
            assert_eq!(bookmark.types.api_version, "v1");
            assert_eq!(
                bookmark.metadata.resource_version,
                server.resource_version().to_string()
            );
            assert!(bookmark.metadata.annotations.is_empty());
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(matches!(
        next(&mut events, "bookmark 2").await.unwrap(),
        WatchEvent::Bookmark(_)
    ));
    assert!(server.counters().bookmarks >= 2);

    // Without allowWatchBookmarks, none.
    let params = WatchParams::default().timeout(2).disable_bookmarks();
    let quiet = pods.watch(&params, &rv).await.unwrap();
    let items: Vec<_> = bounded("a quiet watch", quiet.collect::<Vec<_>>()).await;
    assert!(items.is_empty(), "{items:?}");
}

#[tokio::test]
async fn bookmarks_let_the_watcher_resume_without_a_relist() {
    let server = start();
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watcher::watcher(pods, watcher::Config::default()).boxed();
    let mut errors = Vec::new();
    bounded("list", initial_list(&mut stream, &mut errors)).await;
    for i in 0..5 {
        server.apply(namespace(&format!("ns{i}"), &[])).unwrap();
    }
    let bookmarked = server.resource_version();
    // Keep polling the watcher while bookmarks arrive: they move its resourceVersion but yield
    // no event.
    let quiet = tokio::time::timeout(Duration::from_millis(2500), stream.next()).await;
    assert!(quiet.is_err(), "no event expected");
    assert!(server.counters().bookmarks >= 2);
    server.drop_watches();
    server.apply(web_pod("prod", "c", "Running")).unwrap();
    match bounded("c", next_event(&mut stream, &mut errors, "c")).await {
        Event::Apply(pod) => assert_eq!(pod.name_any(), "c"),
        _ => panic!("expected Apply(c)"),
    }
    let requests = server.requests();
    assert_eq!(lists(&requests).len(), 1, "no relist: {requests:?}");
    let watches = watches(&requests);
    assert_eq!(watches.len(), 2, "{watches:?}");
    let resumed: u64 = watches[1]
        .param("resourceVersion")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        resumed, bookmarked,
        "resumed from the bookmark's resourceVersion"
    );
    assert_eq!(server.counters().dropped_watches, 1);
}

#[tokio::test]
async fn compact_and_dropped_watches_make_the_watcher_relist() {
    // No bookmarks during the test, so the watcher resumes from its list's resourceVersion.
    let server = start_with(Options {
        bookmark_interval: Duration::from_secs(3600),
        ..Options::default()
    });
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watcher::watcher(pods, watcher::Config::default()).boxed();
    let mut errors = Vec::new();
    let first = bounded("list", initial_list(&mut stream, &mut errors)).await;
    assert_eq!(first.len(), 1);
    let listed_at = server.resource_version();
    // Wait until the watch is open, then make its resourceVersion too old and cut it.
    bounded("the watch", until_watching(&server, &mut stream)).await;
    server.compact();
    server.apply(web_pod("prod", "b", "Running")).unwrap();
    // The open watch carries on across the compaction.
    match bounded("b", next_event(&mut stream, &mut errors, "b")).await {
        Event::Apply(pod) => assert_eq!(pod.name_any(), "b"),
        _ => panic!("expected Apply(b)"),
    }
    // Its resumption from b's RV would work, so compact again: b's RV is now too old too.
    server.compact();
    server.drop_watches();
    let relisted = bounded("relist", initial_list(&mut stream, &mut errors)).await;
    let mut names: Vec<String> = relisted.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    assert!(
        errors
            .iter()
            .any(|e| e.contains("too old resource version") && e.contains("Expired")),
        "{errors:?}"
    );
    server.apply(web_pod("prod", "c", "Running")).unwrap();
    assert!(matches!(
        bounded("c", next_event(&mut stream, &mut errors, "c")).await,
        Event::Apply(_)
    ));

    let requests = server.requests();
    let sequence: Vec<String> = requests
        .iter()
        .map(|r| match (r.watch, r.param("resourceVersion")) {
            (true, Some(rv)) => format!("watch@{rv}"),
            (true, None) => "watch".to_owned(),
            (false, _) => "list".to_owned(),
        })
        .collect();
    let b_rv = listed_at + 2; // compact, then b
    assert_eq!(
        sequence,
        [
            "list".to_owned(),
            format!("watch@{listed_at}"),
            format!("watch@{b_rv}"),
            "list".to_owned(),
            format!("watch@{}", b_rv + 1),
        ],
        "{requests:?}"
    );
    assert_eq!(server.counters().expired, 1);
}

#[tokio::test]
async fn forbidden_names_the_resource_and_the_verb() {
    let server = start();
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    server.apply(policy("p", json!({}))).unwrap();
    let client = client(&server).await;
    let pods: Api<Pod> = Api::all(client.clone());
    server.set_forbidden("pods", true).unwrap();
    bounded("forbidden", async {
        let error = pods.list(&ListParams::default()).await.unwrap_err();
        let kube::Error::Api(status) = &error else {
            panic!("not an API error: {error}");
        };
        assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
        assert_eq!(
            status.message,
            "pods is forbidden: User \"system:serviceaccount:tollgate-system:tollgate\" cannot \
             list resource \"pods\" in API group \"\" at the cluster scope"
        );
        assert_eq!(status.details.as_ref().unwrap().kind, "pods");

        let mut stream = watcher::watcher(pods.clone(), watcher::Config::default()).boxed();
        assert!(matches!(next(&mut stream, "Init").await, Ok(Event::Init)));
        let error = next(&mut stream, "the list error").await.unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("failed to perform initial object list"),
            "{text}"
        );
        assert!(text.contains("cannot list resource \"pods\""), "{text}");

        let error = pods
            .watch(&WatchParams::default(), "0")
            .await
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("cannot watch resource \"pods\""),
            "{error}"
        );
        let in_prod: Api<Pod> = Api::namespaced(client.clone(), "prod");
        let error = in_prod.get("a").await.unwrap_err();
        assert!(
            error.to_string().contains(
                "pods \"a\" is forbidden: User \"system:serviceaccount:tollgate-system:tollgate\" \
                 cannot get resource \"pods\" in API group \"\" in the namespace \"prod\""
            ),
            "{error}"
        );
        // Other resources are not affected.
        let policies: Api<DynamicObject> = Api::all_with(client.clone(), &policy_resource());
        assert_eq!(
            policies
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            1
        );
        server.set_forbidden("policies", true).unwrap();
        let error = policies.list(&ListParams::default()).await.unwrap_err();
        assert!(
            error.to_string().contains(
                "policies.tollgate.dev is forbidden: User \
                 \"system:serviceaccount:tollgate-system:tollgate\" cannot list resource \
                 \"policies\" in API group \"tollgate.dev\" at the cluster scope"
            ),
            "{error}"
        );

        server.set_forbidden("pods", false).unwrap();
        assert_eq!(
            pods.list(&ListParams::default()).await.unwrap().items.len(),
            1
        );
        // The watcher recovers on its next poll.
        let objects = initial_list(&mut stream, &mut Vec::new()).await;
        assert_eq!(objects.len(), 1);
    })
    .await;
    assert_eq!(server.counters().forbidden, 5);
}

#[tokio::test]
async fn the_watcher_recovers_after_the_server_was_unavailable() {
    let server = start();
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watcher::watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut errors = Vec::new();
    bounded("list", initial_list(&mut stream, &mut errors)).await;
    bounded("the watch", until_watching(&server, &mut stream)).await;

    server.set_unavailable(true);
    // The open watch is cut by the server's own task: wait until it is gone, so that `b` is
    // made while nothing can see it (bounded).
    let cut = std::time::Instant::now();
    while server.counters().open_watches > 0 {
        assert!(
            cut.elapsed() < Duration::from_secs(5),
            "the watch was never cut"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.apply(web_pod("prod", "b", "Running")).unwrap();
    // Poll the watcher through the outage: it fails to reconnect and backs off.
    let outage = tokio::time::sleep(Duration::from_millis(2500));
    tokio::pin!(outage);
    loop {
        tokio::select! {
            _ = &mut outage => break,
            item = stream.next() => match item {
                Some(Err(error)) => errors.push(error.to_string()),
                Some(Ok(_)) => panic!("an event while the server is gone"),
                None => panic!("the watcher ended"),
            },
        }
    }
    assert!(!errors.is_empty(), "no errors during the outage");
    assert!(server.counters().refused_connections >= 1);
    let before_recovery = server.requests().len();
    server.set_unavailable(false);
    match bounded(
        "b after the outage",
        next_event(&mut stream, &mut errors, "b"),
    )
    .await
    {
        Event::Apply(pod) => assert_eq!(pod.name_any(), "b"),
        _ => panic!("expected Apply(b)"),
    }
    let requests = server.requests();
    assert!(
        requests[before_recovery..]
            .iter()
            .any(|r| r.watch && r.status == 200),
        "{requests:?}"
    );
}

fn policy_resource() -> ApiResource {
    let gvk = GroupVersionKind::gvk("tollgate.dev", "v1alpha1", "Policy");
    ApiResource::from_gvk_with_plural(&gvk, "policies")
}

#[tokio::test]
async fn a_dynamic_watch_of_policies_works() {
    let server = start();
    server
        .apply(policy(
            "allow-dns",
            json!({"egress": [{"port": 53, "protocol": "UDP"}]}),
        ))
        .unwrap();
    let policies: Api<DynamicObject> = Api::all_with(client(&server).await, &policy_resource());
    let mut stream = watcher::watcher(policies.clone(), watcher::Config::default()).boxed();
    let mut errors = Vec::new();
    let initial = bounded("list", initial_list(&mut stream, &mut errors)).await;
    assert_eq!(initial.len(), 1);
    let first = &initial[0];
    assert_eq!(first.name_any(), "allow-dns");
    assert_eq!(first.namespace(), None);
    assert_eq!(first.types.as_ref().unwrap().kind, "Policy");
    assert_eq!(first.data["spec"]["egress"][0]["port"], 53);
    assert_eq!(first.metadata.generation, Some(1));

    server
        .apply(policy(
            "allow-dns",
            json!({"egress": [{"port": 53, "protocol": "TCP"}]}),
        ))
        .unwrap();
    match bounded("modified", next_event(&mut stream, &mut errors, "modified")).await {
        Event::Apply(p) => {
            assert_eq!(p.data["spec"]["egress"][0]["protocol"], "TCP");
            assert_eq!(p.metadata.generation, Some(2));
            assert_eq!(p.metadata.uid, first.metadata.uid);
        }
        _ => panic!("expected Apply"),
    }
    server
        .delete("policies", None, "allow-dns")
        .unwrap()
        .unwrap();
    assert!(matches!(
        bounded("deleted", next_event(&mut stream, &mut errors, "deleted")).await,
        Event::Delete(_)
    ));
    let got = policies.get_opt("allow-dns").await.unwrap();
    assert!(got.is_none());
    assert!(errors.is_empty(), "{errors:?}");
    let requests = server.requests();
    assert!(requests
        .iter()
        .all(|r| r.path.starts_with("/apis/tollgate.dev/v1alpha1/policies")));
}

#[tokio::test]
async fn typed_pods_and_namespaces_deserialize() {
    let server = start();
    let ips = ["10.1.0.7", "fd00:1::7"];
    let web = pod(
        "prod",
        "web-1",
        &[("app", "web")],
        "web-sa",
        "node-a",
        &ips,
        "Running",
        false,
    );
    server.apply(web).unwrap();
    let host = pod(
        "kube-system",
        "proxy",
        &[],
        "proxy",
        "node-a",
        &["10.0.0.2"],
        "Running",
        true,
    );
    server.apply(host).unwrap();
    server
        .apply(namespace("prod", &[("team", "payments")]))
        .unwrap();
    let client = client(&server).await;
    bounded("typed", async {
        let pod = Api::<Pod>::namespaced(client.clone(), "prod").get("web-1").await.unwrap();
        let spec = pod.spec.as_ref().unwrap();
        let status = pod.status.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web-sa"));
        assert_eq!(spec.host_network, None);
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let pod_ips: Vec<&str> = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str()).collect();
        assert_eq!(pod_ips, ips);
        assert_eq!(status.pod_ip.as_deref(), Some("10.1.0.7"));
        assert_eq!(pod.labels()["app"], "web");
        assert!(pod.uid().unwrap().len() == 36);
        assert!(pod.creation_timestamp().is_some());

        let listed = Api::<Pod>::all(client.clone()).list(&ListParams::default()).await.unwrap();
        assert_eq!(listed.items.len(), 2);
        let proxy = listed.items.iter().find(|p| p.name_any() == "proxy").unwrap();
        assert_eq!(proxy.spec.as_ref().unwrap().host_network, Some(true));
        assert_eq!(listed.items.iter().find(|p| p.name_any() == "web-1").unwrap(), &pod);

        let ns = Api::<Namespace>::all(client.clone()).get("prod").await.unwrap();
        assert_eq!(ns.labels()["team"], "payments");
        assert_eq!(ns.labels()["kubernetes.io/metadata.name"], "prod");
        assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
        let error = Api::<Namespace>::all(client.clone()).get("nope").await.unwrap_err();
        assert!(matches!(&error, kube::Error::Api(s) if s.code == 404 && s.message == "namespaces \"nope\" not found"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn too_old_resource_versions_get_410_and_exact_lists_are_snapshots() {
    let server = start();
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    let at_a = server.resource_version();
    server.apply(web_pod("prod", "b", "Running")).unwrap();
    server.apply(web_pod("prod", "a", "Failed")).unwrap();
    let pods: Api<Pod> = Api::all(client(&server).await);
    bounded("410", async {
        let exact = ListParams::default()
            .at(&at_a.to_string())
            .matching(VersionMatch::Exact);
        let old = pods.list(&exact).await.unwrap();
        assert_eq!(old.metadata.resource_version, Some(at_a.to_string()));
        let names: Vec<_> = old.items.iter().map(|p| p.name_any()).collect();
        assert_eq!(names, ["a"]);
        assert_eq!(
            old.items[0].status.as_ref().unwrap().phase.as_deref(),
            Some("Running")
        );

        server.compact();
        let error = pods.list(&exact).await.unwrap_err();
        assert!(
            matches!(&error, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"),
            "{error}"
        );
        let mut events = pods
            .watch(&WatchParams::default(), &at_a.to_string())
            .await
            .unwrap()
            .boxed();
        match next(&mut events, "410").await.unwrap() {
            WatchEvent::Error(status) => {
                assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
                assert!(status.message.starts_with("too old resource version"));
            }
            other => panic!("expected an ERROR event, got {other:?}"),
        }
        assert!(tokio::time::timeout(EVENT_TIMEOUT, events.next())
            .await
            .unwrap()
            .is_none());
    })
    .await;
}

#[tokio::test]
async fn timeout_seconds_ends_a_watch() {
    let server = start();
    let pods: Api<Pod> = Api::all(client(&server).await);
    let started = Instant::now();
    let events = pods
        .watch(
            &WatchParams::default().timeout(1),
            &server.resource_version().to_string(),
        )
        .await
        .unwrap();
    let items: Vec<_> = bounded("timeout", events.collect::<Vec<_>>()).await;
    assert!(items
        .iter()
        .all(|i| matches!(i, Ok(WatchEvent::Bookmark(_)))));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.counters().open_watches, 0);
}

#[tokio::test]
async fn a_streaming_list_watcher_works() {
    let server = start();
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    server.apply(web_pod("prod", "b", "Running")).unwrap();
    let pods: Api<Pod> = Api::all(client(&server).await);
    let mut stream = watcher::watcher(pods, watcher::Config::default().streaming_lists()).boxed();
    let mut errors = Vec::new();
    let objects = bounded("streaming list", initial_list(&mut stream, &mut errors)).await;
    assert_eq!(objects.len(), 2);
    server.apply(web_pod("prod", "c", "Running")).unwrap();
    assert!(matches!(
        bounded("c", next_event(&mut stream, &mut errors, "c")).await,
        Event::Apply(_)
    ));
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "one watch, no list: {requests:?}");
    assert_eq!(requests[0].param("sendInitialEvents"), Some("true"));
}

#[tokio::test]
async fn discovery_documents_parse() {
    let server = start();
    let client = client(&server).await;
    bounded("discovery", async {
        let groups = client.list_api_groups().await.unwrap();
        assert_eq!(groups.groups[0].name, "tollgate.dev");
        let resources = client
            .list_api_group_resources("tollgate.dev/v1alpha1")
            .await
            .unwrap();
        assert_eq!(resources.resources[0].name, "policies");
        assert!(!resources.resources[0].namespaced);
        let core = client.list_core_api_resources("v1").await.unwrap();
        assert!(core
            .resources
            .iter()
            .any(|r| r.name == "pods" && r.namespaced));
        assert_eq!(
            client.list_core_api_versions().await.unwrap().versions,
            ["v1"]
        );
        assert_eq!(client.apiserver_version().await.unwrap().major, "1");
    })
    .await;
}

/// One HTTP/1.1 request on a fresh connection; the status and body. A connection the server
/// resets (over its limit) reads as status 0 with no body, whether the reset arrives before
/// the request is written or after.
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    if stream.write_all(request.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut response = Vec::new();
    let _ = stream.take(1 << 20).read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn bad_requests_get_a_status_and_the_server_keeps_serving() {
    let server = start();
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    let addr = server.addr();
    let auth = format!("Authorization: Bearer {}", server.token());
    let get = |path: &str| {
        http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\nConnection: close\r\n\r\n"),
        )
    };
    let status_of = |(code, body): (u16, String)| -> (u16, String, String) {
        let value: Value = serde_json::from_str(body.trim()).unwrap_or(Value::Null);
        assert_eq!(value["kind"], "Status", "{body}");
        assert_eq!(value["code"], code);
        (
            code,
            value["reason"].as_str().unwrap().to_owned(),
            value["message"].as_str().unwrap().to_owned(),
        )
    };
    let (code, body) = http(
        addr,
        "GET /api/v1/pods HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status_of((code, body)).1, "Unauthorized");
    assert_eq!(status_of(get("/nope")).0, 404);
    let (code, reason, message) = status_of(get("/api/v1/namespaces/prod/pods/missing"));
    assert_eq!(
        (code, reason.as_str(), message.as_str()),
        (404, "NotFound", "pods \"missing\" not found")
    );
    let post = format!("POST /api/v1/pods HTTP/1.1\r\nHost: x\r\n{auth}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}");
    assert_eq!(status_of(http(addr, &post)).0, 405);
    for bad in [
        "/api/v1/pods?limit=abc",
        "/api/v1/pods?limit=-1",
        "/api/v1/pods?pretty=true",
        "/api/v1/pods?continue=zzz",
        "/api/v1/pods?continue=00",
        "/api/v1/pods?resourceVersion=abc",
        "/api/v1/pods?resourceVersionMatch=Exact",
        "/api/v1/pods?resourceVersion=0&resourceVersionMatch=Exact",
        "/api/v1/pods?watch=maybe",
        "/api/v1/pods?watch=true&resourceVersionMatch=NotOlderThan&resourceVersion=1",
        "/api/v1/pods?watch=true&sendInitialEvents=true",
        "/api/v1/pods?labelSelector=a%3E1",
        "/api/v1/pods?labelSelector=%21%21",
        "/api/v1/pods?fieldSelector=nonsense",
        "/api/v1/namespaces/prod/pods/a?watch=true",
    ] {
        let (code, reason, _) = status_of(get(bad));
        assert_eq!((code, reason.as_str()), (400, "BadRequest"), "{bad}");
    }
    // A resourceVersion from the future: 504 with Retry-After, which kube's default retry layer
    // honours (up to 15 times), so this is checked without kube.
    let future = "/api/v1/pods?resourceVersion=999999&resourceVersionMatch=NotOlderThan";
    let (code, reason, message) = status_of(get(future));
    assert_eq!((code, reason.as_str()), (504, "Timeout"));
    assert!(
        message.starts_with("Too large resource version: 999999"),
        "{message}"
    );
    let (code, _) = http(addr, "BLAH\r\n\r\n");
    assert!(code == 400 || code == 0, "{code}");
    let (code, body) = get("/api/v1/namespaces/prod/pods/a");
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["metadata"]["name"],
        "a"
    );
    let (code, body) = get("/api/v1/pods");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, list["kind"].as_str()), (200, Some("PodList")));
    assert!(
        list["items"][0].get("kind").is_none(),
        "built-in list items have no kind"
    );
}

#[test]
fn servers_are_independent_and_stop_on_drop() {
    let first = start();
    let second = start();
    first.apply(namespace("only-in-first", &[])).unwrap();
    assert!(second.get("namespaces", None, "only-in-first").is_none());
    assert!(first.get("Namespace", None, "only-in-first").is_some());

    // An open watch on a raw connection ends when the server stops.
    let addr = first.addr();
    let mut watch = TcpStream::connect(addr).unwrap();
    watch
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let request = format!(
        "GET /api/v1/namespaces?watch=1&allowWatchBookmarks=true HTTP/1.1\r\nHost: x\r\n\
         Authorization: Bearer {}\r\n\r\n",
        first.token()
    );
    watch.write_all(request.as_bytes()).unwrap();
    let mut head = [0u8; 512];
    let n = watch.read(&mut head).unwrap();
    let head = String::from_utf8_lossy(&head[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );

    let started = Instant::now();
    drop(first);
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut rest = Vec::new();
    // EOF or a reset, not the read timeout.
    let _ = watch.take(1 << 20).read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(TcpStream::connect(addr).is_err(), "the listener is closed");
    assert_eq!(second.resource_version(), 1000);
}

#[tokio::test]
async fn a_short_history_expires_old_resource_versions() {
    let server = start_with(Options {
        history_limit: 3,
        ..Options::default()
    });
    server.apply(web_pod("prod", "a", "Running")).unwrap();
    let listed_at = server.resource_version();
    for i in 0..5 {
        server.apply(namespace(&format!("ns{i}"), &[])).unwrap();
    }
    let pods: Api<Pod> = Api::all(client(&server).await);
    bounded("history", async {
        let params = WatchParams::default().disable_bookmarks().timeout(10);
        let mut expired = pods
            .watch(&params, &listed_at.to_string())
            .await
            .unwrap()
            .boxed();
        match next(&mut expired, "410").await.unwrap() {
            WatchEvent::Error(status) => assert_eq!(status.code, 410),
            other => panic!("expected 410, got {other:?}"),
        }
        // Three changes back is still in the history.
        let recent = (server.resource_version() - 3).to_string();
        let mut events = pods.watch(&params, &recent).await.unwrap().boxed();
        server.apply(web_pod("prod", "b", "Running")).unwrap();
        match next(&mut events, "b").await.unwrap() {
            WatchEvent::Added(pod) => assert_eq!(pod.name_any(), "b"),
            other => panic!("expected ADDED b, got {other:?}"),
        }
    })
    .await;
}

#[test]
fn connections_over_the_limit_are_reset() {
    let server = start_with(Options {
        max_connections: 1,
        ..Options::default()
    });
    let request = format!(
        "GET /api/v1/namespaces HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token()
    );
    let mut first = TcpStream::connect(server.addr()).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    first.write_all(request.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let n = first.read(&mut buf).unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The first connection is kept alive, so a second one is over the limit.
    let (code, body) = http(server.addr(), &request);
    assert_eq!((code, body.as_str()), (0, ""));
    assert_eq!(server.counters().refused_connections, 1);
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, _) = http(
            server.addr(),
            &request.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"),
        );
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}
