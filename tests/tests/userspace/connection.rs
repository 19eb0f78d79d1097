//! A guest that counts and holds a TCP connection open, for the scenarios
//! that move a running guest (snapshot, migration): the host's echo server,
//! the guest's side of the connection, its counter.

use tests::guest::{Guest, NetNs, GUEST_IP, HOST_IP, INIT_OK};
use tests::host::Proc;

/// An echo server on port 7000 in `ns`, listening when this returns.
pub fn echo_server(ns: &NetNs) -> Proc {
    let echo = ns
        .spawn(&["socat", "TCP-LISTEN:7000,reuseaddr", "EXEC:cat"])
        .expect("echo server");
    ns.sh("for i in $(seq 1 100); do ss -ltn | grep -q :7000 && exit 0; sleep 0.1; done; exit 1")
        .ok("the echo server listens");
    echo
}

/// The guest, once its shell answers: its address, a TCP connection to
/// the echo server (nc reading a FIFO that the shell keeps open as fd 3,
/// so the connection lives as long as the shell; what comes back in
/// /tmp/from-host), checked to carry data, and a counter in /tmp/counter.
pub fn guest_with_a_connection(g: &mut Guest) {
    g.wait_shell(INIT_OK);
    g.run(&format!(
        "ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up"
    ));
    g.run(&format!(
        "mkfifo /tmp/to-host; exec 3<>/tmp/to-host; \
         nc {HOST_IP} 7000 </tmp/to-host >/tmp/from-host 2>&1 &"
    ));
    assert!(
        echo_of(g, "before").contains("before"),
        "the connection carries data\n{}",
        g.report()
    );
    g.run("(i=0; while :; do i=$((i+1)); echo $i >/tmp/counter; sleep 1; done) >/dev/null 2>&1 &");
}

/// Sends `word` over the guest's connection and waits for its echo; what
/// came back so far.
pub fn echo_of(g: &mut Guest, word: &str) -> String {
    g.run(&format!(
        "echo {word} >&3; for i in $(seq 1 100); do grep -q {word} /tmp/from-host && break; \
         sleep 0.2; done; cat /tmp/from-host"
    ))
}

/// The guest's counter (`/tmp/counter`).
pub fn counter(g: &mut Guest) -> u64 {
    counter_after(g, 0)
}

/// The guest's counter after `secs` seconds.
pub fn counter_after(g: &mut Guest, secs: u32) -> u64 {
    g.run(&format!("sleep {secs}; cat /tmp/counter"))
        .trim()
        .parse()
        .expect("the guest's counter")
}
