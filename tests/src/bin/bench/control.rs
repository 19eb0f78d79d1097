//! Section 4, control: round trips of `status` on the control socket, one
//! client and many at once, against QEMU's QMP.

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::ctl::LineClient;
use crate::report::{dur, stats, Stats, Table};
use crate::{boot_idle, Ctx};

pub(super) fn control(cx: &Ctx) -> Result<(), String> {
    let sock = cx.tmp.0.join("run/bench/control.sock");
    let p = boot_idle(cx, &cx.ours, Some(&sock))?;
    let mut c = LineClient::connect(&sock, Duration::from_secs(20))?;
    let (st, _) = c.ours(r#"{"cmd":"status"}"#)?;
    if st["state"] != "running" {
        return Err(format!("status says {st} (expected running)"));
    }
    let mut t = Table::new(&[
        "request", "clients", "requests", "p50", "p90", "p99", "max", "req/s", "target",
    ]);
    let push = |t: &mut Table, label: &str, clients: usize, lat: &[f64], wall: f64| {
        let s = stats(lat);
        let f = |g: fn(&Stats) -> f64| s.as_ref().map(|s| dur(g(s))).unwrap_or_default();
        let rate = lat.len() as f64 / wall;
        let target = match s {
            _ if !label.starts_with("vmm") => String::new(),
            // Back-to-back clients queue behind each other: by Little's
            // law each waits about clients / throughput.
            Some(_) if clients > 1 => format!(
                "(queueing: {clients}/rate = {})",
                dur(clients as f64 / rate)
            ),
            Some(s) if s.p99 < 1e-3 => "p99 < 1 ms idle: met".into(),
            Some(_) => "p99 < 1 ms idle: missed".into(),
            None => String::new(),
        };
        t.row(vec![
            label.into(),
            clients.to_string(),
            lat.len().to_string(),
            f(|s| s.median),
            f(|s| s.p90),
            f(|s| s.p99),
            f(|s| s.max),
            format!("{rate:.0}"),
            target,
        ]);
    };

    // 1 client
    for _ in 0..100 {
        c.ours(r#"{"cmd":"status"}"#)?;
    }
    let mut lat = Vec::with_capacity(cx.o.requests);
    let t0 = Instant::now();
    for _ in 0..cx.o.requests {
        lat.push(c.ours(r#"{"cmd":"status"}"#)?.1.as_secs_f64());
    }
    push(&mut t, "vmm status", 1, &lat, t0.elapsed().as_secs_f64());

    // N concurrent clients
    let n = cx.o.clients;
    let per = cx.o.per_client;
    let barrier = Arc::new(Barrier::new(n + 1));
    let (lat, wall) = std::thread::scope(|s| -> Result<(Vec<f64>, f64), String> {
        let hs: Vec<_> = (0..n)
            .map(|_| {
                let b = barrier.clone();
                let sock = sock.clone();
                s.spawn(move || -> Result<Vec<f64>, String> {
                    let c = LineClient::connect(&sock, Duration::from_secs(20));
                    b.wait();
                    let mut c = c?;
                    let mut v = Vec::with_capacity(per);
                    for _ in 0..per {
                        v.push(c.ours(r#"{"cmd":"status"}"#)?.1.as_secs_f64());
                    }
                    Ok(v)
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut all = Vec::with_capacity(n * per);
        let mut err = None;
        for h in hs {
            match h.join() {
                Ok(Ok(v)) => all.extend(v),
                Ok(Err(e)) => err = Some(e),
                Err(_) => err = Some("a client thread panicked".into()),
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        match err {
            Some(e) => Err(format!("concurrent clients: {e}")),
            None => Ok((all, wall)),
        }
    })?;
    push(&mut t, "vmm status", n, &lat, wall);
    drop(c);
    p.kill();

    // QMP reference
    if let Some(v) = &cx.qemu {
        let qsock = cx.tmp.0.join("qmp.sock");
        let q = boot_idle(cx, v, Some(&qsock))?;
        let mut c = LineClient::connect(&qsock, Duration::from_secs(20))?;
        c.qmp_handshake()?;
        for _ in 0..100 {
            c.qmp(r#"{"execute":"query-status"}"#)?;
        }
        let mut lat = Vec::with_capacity(cx.o.requests);
        let t0 = Instant::now();
        for _ in 0..cx.o.requests {
            lat.push(c.qmp(r#"{"execute":"query-status"}"#)?.as_secs_f64());
        }
        push(
            &mut t,
            &format!("{} QMP query-status", v.label()),
            1,
            &lat,
            t0.elapsed().as_secs_f64(),
        );
        q.kill();
    }
    t.print();
    println!("  Round trip = write of the request line to the read of the response line, per request; {n} clients each send {per} requests back to back, all at once.");
    println!("  QMP serves one client per monitor socket, so it has a 1-client figure only.");
    Ok(())
}
