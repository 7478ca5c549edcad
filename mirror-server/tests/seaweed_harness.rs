//! The SeaweedFS harness (tests/common/seaweed.rs) itself: two instances at
//! once, each with its own ports and bucket; one killed (its port closes)
//! and restarted on the same directory (it answers again, its object still
//! there). Needs `weed` from scripts/deps.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::seaweed::Seaweed;

fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[test]
fn two_instances_stop_and_restart() {
    common::seaweed::self_check();
    let began = Instant::now();
    let (a, mut b) = std::thread::scope(|s| {
        let a = s.spawn(Seaweed::start);
        let b = s.spawn(Seaweed::start);
        (a.join().unwrap(), b.join().unwrap())
    });
    eprintln!("two instances ready in {:?}", began.elapsed());
    assert_ne!(a.endpoint, b.endpoint);
    assert_eq!(a.endpoint, format!("http://127.0.0.1:{}", a.port()));

    let object = common::noise(7, 1 << 20);
    for (sw, name) in [(&a, "a"), (&b, "b")] {
        let bucket = format!("/{}", sw.bucket);
        assert_eq!(
            sw.request("HEAD", &bucket, b"").unwrap().0,
            200,
            "{name}: HEAD bucket"
        );
        let key = format!("{bucket}/dir/object-{name}");
        assert_eq!(
            sw.request("PUT", &key, &object).unwrap().0,
            200,
            "{name}: PUT"
        );
        let (status, body) = sw.request("GET", &key, b"").unwrap();
        assert_eq!(status, 200, "{name}: GET");
        assert!(body == object, "{name}: GET returned other bytes");
        let (status, _) = sw
            .request("GET", &format!("{bucket}/no-such-key"), b"")
            .unwrap();
        assert_eq!(status, 404, "{name}: GET of a missing key");
        let (status, list) = sw
            .request("GET", &format!("{bucket}?list-type=2"), b"")
            .unwrap();
        assert_eq!(status, 200, "{name}: list");
        let list = String::from_utf8_lossy(&list);
        assert!(
            list.contains(&format!("<Key>dir/object-{name}</Key>")),
            "{name}: list: {list}"
        );
    }

    b.stop();
    assert!(!port_open(b.port()), "b's S3 port still open after stop");
    b.stop(); // idempotent
    assert!(port_open(a.port()), "a stopped with b");
    assert!(b.request("HEAD", &format!("/{}", b.bucket), b"").is_err());

    let began = Instant::now();
    b.restart();
    eprintln!("b restarted in {:?}", began.elapsed());
    assert!(port_open(b.port()));
    let (status, body) = b
        .request("GET", &format!("/{}/dir/object-b", b.bucket), b"")
        .unwrap();
    assert_eq!(status, 200, "GET after restart");
    assert!(body == object, "b's object changed across the restart");

    let dirs = [a.dir().to_path_buf(), b.dir().to_path_buf()];
    drop(a);
    drop(b);
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
