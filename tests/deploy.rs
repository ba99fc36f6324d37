//! The documented deploy (issue 12 item 12): one `[::]` listen address
//! serves IPv4 and IPv6 clients; `0.0.0.0` and `[::]` on one port both
//! bind instead of "Address already in use".

mod common;

use common::*;
use tempfile::TempDir;
use tollgate::client::Session;

async fn serves(listen: &[String], port: u16) {
    let dir = TempDir::new().unwrap();
    let path = write_config(
        dir.path(),
        "",
        &format!(
            "[default_customer]\nbackup_location = \"{}/default\"\nauto_add_clients = true\n",
            dir.path().display()
        ),
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "listen = [\"127.0.0.1:0\"]",
        &format!(
            "listen = [{}]",
            listen
                .iter()
                .map(|l| format!("\"{l}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    std::fs::write(&path, text).unwrap();
    let d = Daemon::start(dir.path());
    for (i, server) in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")]
        .into_iter()
        .enumerate()
    {
        let mut o = d.opts(&format!("PC-{i}"));
        o.server = server.clone();
        let s = Session::connect(&o)
            .await
            .unwrap_or_else(|e| panic!("{listen:?}: {server}: {e}\n{}", d.log()));
        s.bye().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_ipv6_wildcard_serves_both_families() {
    let p = free_port();
    serves(&[format!("[::]:{p}")], p).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ipv4_and_ipv6_wildcards_on_one_port_both_bind() {
    let p = free_port();
    serves(&[format!("0.0.0.0:{p}"), format!("[::]:{p}")], p).await;
}
