//! A fresh PostgreSQL database per test, on the local server scripts/install-tools.sh
//! starts (`AGENTD_TEST_POSTGRES` names another); dropped when the test ends. Without a
//! reachable server the test fails saying so, never skips.

pub fn admin_url() -> String {
    std::env::var("AGENTD_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// HOST:PORT of the test PostgreSQL (from its URL).
pub fn db_address() -> String {
    let url = admin_url();
    let after_at = url.rsplit_once('@').map_or(url.as_str(), |(_, h)| h);
    after_at
        .split('/')
        .next()
        .unwrap_or("127.0.0.1:5432")
        .to_string()
}

/// A fresh database, dropped when the test ends.
#[derive(Debug)]
pub struct Database {
    pub url: String,
    name: String,
    rt: tokio::runtime::Runtime,
}

impl Database {
    pub fn create() -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let admin = admin_url();
        let name = format!("agentd_e2e_{:016x}", rand::random::<u64>());
        rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .map_err(|e| {
                    let why = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
                    anyhow::anyhow!(
                        "no test connection to PostgreSQL at {admin} ({why}): these tests need a running server that lets postgres in from 127.0.0.1; scripts/install-tools.sh (run by make test and .ci/run) installs and starts one, or set AGENTD_TEST_POSTGRES"
                    )
                })?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await?;
            anyhow::Ok(())
        })?;
        let (base, _) = admin
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("AGENTD_TEST_POSTGRES must end in /DATABASE"))?;
        Ok(Self {
            url: format!("{base}/{name}"),
            name,
            rt,
        })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let (admin, name) = (admin_url(), self.name.clone());
        let _ = self.rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
                .await
                .ok()?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .ok()
        });
    }
}

/// A TCP relay to PostgreSQL that the test can cut (every connection closed, the port
/// refusing) and restore on the same port: the database going away, as the server sees it.
#[derive(Debug)]
pub struct Relay {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Relay {
    /// `db_url` (a database of the test PostgreSQL) through this relay.
    pub fn url_for(&self, db_url: &str) -> String {
        let (base, name) = db_url.rsplit_once('/').map_or(("", ""), |p| p);
        let host_end = base.rfind(':').unwrap_or(base.len());
        format!("{}:{}/{name}", &base[..host_end], self.port)
    }

    pub fn start() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let relay = Self {
            port,
            cut: Default::default(),
            open: Default::default(),
        };
        relay.serve(listener);
        Ok(relay)
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let (cut, open) = (self.cut.clone(), self.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if cut.load(std::sync::atomic::Ordering::SeqCst) {
                    return; // the listener goes with this thread: the port refuses
                }
                let Ok(client) = client else { continue };
                let Ok(db) = std::net::TcpStream::connect(db_address()) else {
                    continue;
                };
                if let (Ok(c2), Ok(d2)) = (client.try_clone(), db.try_clone()) {
                    let mut held = open.lock().unwrap_or_else(|p| p.into_inner());
                    held.push(c2);
                    held.push(d2);
                }
                for (mut from, mut to) in [
                    (client.try_clone(), db.try_clone()),
                    (db.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
    }

    /// Closes every relayed connection and stops accepting.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so that it drops the listener.
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        for s in self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Accepts again on the same port.
    pub fn restore(&self) -> anyhow::Result<()> {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        };
        self.serve(listener);
        Ok(())
    }
}
