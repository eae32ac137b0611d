//! A node agent given several server addresses attests through whichever answers, and when
//! its server is killed (SIGKILL) it moves to the next address that answers: new entries and
//! revocations reach its workloads, and its revocation feed resumes where it was.
//!
//! The second address is the same server's data dir started again elsewhere (one store can
//! have one server here); the node agent only sees one address refuse and another answer.

use std::time::{Duration, Instant};

use agentd_e2e::{free_port, wait_until, Env, Node, Server};

#[test]
fn a_node_agent_fails_over_to_the_next_server_address() -> anyhow::Result<()> {
    let env = Env::new();
    let mut server = Server::start(&env)?;
    let first = server.address.clone();
    let second = format!("127.0.0.1:{}", free_port()?);

    // Attestation with a dead address in the list goes through the one that answers. (The
    // node agent starts at an address picked at random, so only about every other run
    // tries the dead one first; the failover below is exercised every time: the node is on
    // the live address, which then dies.)
    let token = server.join_token("spiffe://example.org/node/ha")?;
    let addresses = format!("{second},{first}");
    let mut node = Node::start_at(&env, "ha", &addresses, &server, &token, &[])?;
    let before = server.register_own_uid(&node.spiffe_id, "spiffe://example.org/ha/before", &[])?;
    node.wait_for_svid("spiffe://example.org/ha/before")?;

    // The server dies; the same deployment answers at the other address.
    server.kill();
    server.restart_at(&second)?;
    assert_eq!(server.address, second);

    // A new entry made there reaches the node agent's workload.
    server.register_own_uid(&node.spiffe_id, "spiffe://example.org/ha/after", &[])?;
    node.wait_for_svid("spiffe://example.org/ha/after")?;
    let log = node.daemon.log_text();
    assert!(
        log.contains("server unreachable; connected to another"),
        "the node agent's log says nothing of the failover:\n{log}"
    );

    // A revocation made there reaches it too, through the feed resumed on the new server
    // (healthy: synced, and the feed caught up on the new server).
    node.wait_healthy()?;
    let started = Instant::now();
    server.cli_ok(&[
        "revoke",
        "entry",
        "--id",
        &before,
        "--reason",
        "failover test",
    ])?;
    let gone = wait_until(Duration::from_secs(10), || {
        let out = node.fetch_x509();
        !String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/ha/before")
    });
    assert!(
        gone,
        "the revoked SVID is still served:\n{}",
        node.daemon.log_text()
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the revocation took {took:?} to reach the node agent after the failover"
    );
    // The other SVID is still served.
    let out = node.fetch_x509();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/ha/after"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
