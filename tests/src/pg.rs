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
