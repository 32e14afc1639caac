use tenantgate_host_tests::*;
#[test]
fn scratch() {
    let t0 = std::time::Instant::now();
    let host = Host::builder(std::env::var("W").unwrap()).build().unwrap();
    eprintln!("compile {:?}", t0.elapsed());
    eprintln!("imports {:?}\nstubbed {:?}", host.imports(), host.stubbed_imports());
    let mut vm = host.vm().unwrap();
    assert!(vm.configure("hello").unwrap());
    assert!(!vm.configure("bad").unwrap());
    let r = vm.request().header("x-user", "alice").header_bytes("x-bin", b"\xff").header("x-remove", "1").path("/a?b")
        .metadata(&["envoy.filters.http.jwt_authn", "payload", "tenant"], serde_json::json!("/acme/eu")).send().unwrap();
    eprintln!("{r:?}");
    let r = vm.request().header("x-deny", "1").send().unwrap();
    eprintln!("{r:?}");
    vm.tick().unwrap();
    host.clock().advance(std::time::Duration::from_secs(1));
    vm.tick().unwrap();
    let mut vm2 = host.vm().unwrap();
    assert!(vm2.reload("second").unwrap());
    assert!(!vm2.reload("bad2").unwrap());
    vm2.request().send().unwrap();
    for l in host.logs() { eprintln!("{l:?}"); }
    eprintln!("metrics {:?}", host.metrics());
    eprintln!("shared {:?} {:?}", host.shared_data().peek(b"k"), host.shared_data().stats());
    eprintln!("unimpl {:?}", host.unimplemented_calls());
    let t0 = std::time::Instant::now();
    for _ in 0..1000 { vm.request().header("x-user", "bob").send().unwrap(); }
    eprintln!("1000 req {:?}", t0.elapsed());
}
