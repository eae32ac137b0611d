//! The `agentd` command line. Names are fixed by the design (users and scripts rely on them):
//! `server run`, `node run`, `token generate`, `entry ...`, `node list|show|evict`,
//! `bundle show`, `api fetch|validate|watch`, `healthcheck`.
//!
//! Over 600 lines: this file is the clap definition of every command and flag (with the help
//! text users read) and the dispatch to the command modules; keeping the whole tree in one
//! place is what lets a reader check it against docs/cli.md.

mod admin;
mod audit;
mod bulk;
pub mod connect;
mod console;
mod daemon;
mod delegation;
mod federation;
mod output;
mod revoke;
mod workload;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use output::Output;

use self::connect::{DEFAULT_ADMIN_SOCKET, DEFAULT_SOCKET_PATH};
use crate::node::config::{DEFAULT_SERVER_ADDRESS, DEFAULT_SYNC_INTERVAL};
use crate::server::config::{DEFAULT_BIND_ADDRESS, DEFAULT_TRUST_DOMAIN};
use crate::ttl::Ttl;

#[derive(Debug, Parser)]
#[command(
    name = "agentd",
    version,
    about = "SPIFFE workload identity for AI agents"
)]
pub struct Cli {
    /// Output format for commands that print data.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The central server.
    #[command(subcommand)]
    Server(ServerCommand),
    /// The node agent, and the server's view of attested nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// The trust bundle, and the bundles of federated trust domains.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Federation relationships with other trust domains (their bundle endpoints).
    #[command(subcommand)]
    Federation(FederationCommand),
    /// Revocations: kill an SVID, entry, node, grant, task or CA authority everywhere.
    #[command(subcommand)]
    Revoke(RevokeCommand),
    /// Workload API client commands (talk to the node agent's socket).
    #[command(subcommand)]
    Api(ApiCommand),
    /// Checks that a node agent (socket) or the server (admin socket) is up and ready.
    Healthcheck(HealthcheckArgs),
    /// The hash-chained audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Accountable owners of entries.
    #[command(subcommand)]
    Owner(OwnerCommand),
    /// Entries, nodes, live SVIDs, grants and revocations, by owner and by node.
    Inventory {
        /// The window for the count of stale entries: seconds or a duration [default: 30d].
        #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
        stale: Option<Ttl>,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// The CA's signing authorities, and manual CA rotation.
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Delegation grants: a principal authorizes an agent with scopes.
    #[command(subcommand)]
    Grant(GrantCommand),
    /// Reads and verifies SVIDs (X.509 PEM files or JWT-SVIDs).
    #[command(subcommand)]
    Svid(SvidCommand),
    /// A local web console over the admin API: inventory, delegation graph, audit timeline and
    /// the kill switch. Prints the URL to open, with a one-time login token, on its first line.
    Console(console::ConsoleArgs),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Prints audit records, oldest first.
    Show {
        /// Records since a time: RFC 3339 (2026-01-31T12:00:00Z) or a duration ago (90s, 8h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Records whose subject or actor is this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// An action (x509svid.issue), or a prefix ending in * (entry.*).
        #[arg(long)]
        action: Option<String>,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Checks the hash chain; names the first altered or missing record and exits non-zero.
    Verify(AdminSocketArg),
}

#[derive(Debug, Subcommand)]
pub enum OwnerCommand {
    /// Disables an owner: flags the owner's entries (and, with suspend_disabled_owners in the
    /// server config, the server mints nothing for them).
    Disable {
        /// The owner, as entries name it (e.g. alice@example.com).
        owner: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Enables an owner again.
    Enable {
        /// The owner, as entries name it (e.g. alice@example.com).
        owner: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Creates a grant; prints its id.
    Create {
        /// user:NAME or a SPIFFE ID: on whose behalf the agent acts.
        #[arg(long)]
        principal: String,
        /// The agent's SPIFFE ID (it must have an entry; its scopes are the ceiling).
        #[arg(long)]
        agent: String,
        /// resource:action or resource:*; repeat for several.
        #[arg(long = "scope", value_name = "SCOPE", required = true)]
        scopes: Vec<String>,
        /// Lifetime: seconds or a duration [default: 8h, or 10m with --task].
        #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
        ttl: Option<Ttl>,
        /// A task id: SVIDs carry it and are short-lived.
        #[arg(long)]
        task: Option<String>,
        /// How many further agent-to-agent delegations are allowed [default: 0].
        #[arg(long)]
        max_depth: Option<u32>,
        /// Narrows the OAuth resources (URL prefixes, each under one of the agent entry's
        /// --resource) access tokens under this grant may be for; repeat for several;
        /// none: the entry's.
        #[arg(long = "resource", value_name = "URL_PREFIX")]
        resources: Vec<String>,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Lists live grants (--all: expired ones too).
    List {
        /// Only grants to this agent (SPIFFE ID).
        #[arg(long)]
        agent: Option<String>,
        /// Expired grants too.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Shows one grant.
    Show {
        /// The grant's id, as `grant create` and `grant list` print it.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
}

#[derive(Debug, Args)]
pub struct SvidInput {
    /// A PEM file (certificate chain, leaf first), a file holding a JWT-SVID, or the token.
    pub input: String,
    /// Trust bundle to verify against: PEM, or the SPIFFE bundle JSON (needed for JWTs).
    /// Without it, the SVID is decoded but NOT verified.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// The audience a JWT-SVID must name (required to verify a JWT-SVID).
    #[arg(long)]
    pub audience: Option<String>,
    /// The server's extension_oid_base, when not the default.
    #[arg(long)]
    pub oid_base: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SvidCommand {
    /// Prints who the SVID names, its scopes, principal, delegation chain and task.
    Inspect(SvidInput),
    /// Exits non-zero unless the (verified) SVID holds every --scope.
    Check {
        #[command(flatten)]
        svid: SvidInput,
        /// A scope the SVID must hold; repeat for several.
        #[arg(long = "scope", value_name = "SCOPE", required = true)]
        scopes: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log level (trace, debug, info, warn, error) or a tracing filter; RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Log lines as text (key=value fields) or json (one object per line), on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Runs the server.
    Run(ServerRunArgs),
    /// Copies a stopped server's embedded store into an empty PostgreSQL database; then run
    /// the server on the same data dir with `--datastore URL`. The embedded store is kept.
    Migrate(ServerMigrateArgs),
}

#[derive(Debug, Args)]
pub struct ServerMigrateArgs {
    /// The server's data dir (its embedded store is DATA_DIR/datastore; the server must be
    /// stopped).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The PostgreSQL database to fill, postgres://user@host:port/database; it must hold no
    /// records yet.
    #[arg(long, env = "AGENTD_MIGRATE_TO", hide_env_values = true)]
    pub to: String,
    #[command(flatten)]
    pub log: LogArgs,
}

// The daemons' flags carry no clap default: a flag overrides the config file, so an absent
// flag must stay absent. The defaults shown in their help are the config code's.
#[derive(Debug, Args)]
pub struct ServerRunArgs {
    /// TOML config file; flags override it, and the defaults shown apply to what neither sets.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, help = format!("The trust domain [default: {DEFAULT_TRUST_DOMAIN}]"))]
    pub trust_domain: Option<String>,
    /// The store and the CA keys [default: /var/lib/agentd/server as root, else
    /// ~/.local/share/agentd/server].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, help = format!(
        "Node API address, HOST:PORT (port 0 picks a free one) [default: {DEFAULT_BIND_ADDRESS}]"
    ))]
    pub bind_address: Option<String>,
    #[arg(long, env = connect::ADMIN_SOCKET_ENV, help = format!(
        "The admin socket (mode 0600) [default: {DEFAULT_ADMIN_SOCKET}]"
    ))]
    pub admin_socket: Option<PathBuf>,
    /// Serve /metrics, /live and /ready on HOST:PORT (port 0 picks a free one, logged).
    #[arg(long)]
    pub metrics_address: Option<String>,
    /// Keep the records in PostgreSQL, postgres://user@host:port/database [default: the
    /// embedded store in the data dir].
    #[arg(long, env = "AGENTD_DATASTORE", hide_env_values = true)]
    pub datastore: Option<String>,
    /// Serve this trust domain's bundle to federated trust domains on HOST:PORT (SPIFFE
    /// bundle endpoint; https_spiffe unless [federation.https_web] is configured).
    #[arg(long)]
    pub federation_bind_address: Option<String>,
    /// Serve the OAuth front door on HOST:PORT: discovery, JWKS, token exchange for MCP and
    /// other OAuth tool servers, introspection (docs/oauth.md).
    #[arg(long)]
    pub oauth_bind_address: Option<String>,
    /// The front door's issuer URL, which JWT-SVIDs then carry as iss [default:
    /// https://HOST:PORT of --oauth-bind-address].
    #[arg(long, value_name = "URL")]
    pub oauth_issuer: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Args)]
pub struct AdminSocketArg {
    /// The server's admin socket.
    #[arg(long, env = connect::ADMIN_SOCKET_ENV, default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
}

// Parsed once per process: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Runs the node agent.
    Run(NodeRunArgs),
    /// Lists attested nodes.
    List(AdminSocketArg),
    /// Shows one attested node.
    Show {
        /// The node's SPIFFE ID, as `node list` prints it.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Evicts a node: it must attest again with a new join token.
    Evict {
        /// The node's SPIFFE ID, as `node list` prints it.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Bans a node: the same as `agentd revoke node` (kill switch; its SVIDs are revoked and
    /// it may not attest again until the revocation is lifted or a new join token is made).
    Ban {
        /// The node's SPIFFE ID, as `node list` prints it.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
}

#[derive(Debug, Args)]
pub struct NodeRunArgs {
    /// TOML config file; flags override it, and the defaults shown apply to what neither sets.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', help = format!(
        "The server's node API, HOST:PORT; several servers comma-separated or with the flag repeated (the node agent uses one and fails over to the next that answers) [default: {DEFAULT_SERVER_ADDRESS}]"
    ))]
    pub server_address: Vec<String>,
    /// Join token for the first attestation; unused once the data dir holds an identity.
    #[arg(long, env = "AGENTD_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// x509pop node attestation: the node certificate (PEM, leaf first); with --x509pop-key.
    #[arg(long, requires = "x509pop_key")]
    pub x509pop_cert: Option<PathBuf>,
    /// x509pop node attestation: the certificate's private key (PEM).
    #[arg(long, requires = "x509pop_cert")]
    pub x509pop_key: Option<PathBuf>,
    /// Platform claims node attestation: file holding the platform-issued JWT.
    #[arg(long)]
    pub claims_token_file: Option<PathBuf>,
    /// The server's trust bundle (PEM), to authenticate it on first contact.
    #[arg(long, conflicts_with = "insecure_bootstrap")]
    pub trust_bundle: Option<PathBuf>,
    /// Trust any server on first contact. Trial use only.
    #[arg(long)]
    pub insecure_bootstrap: bool,
    #[arg(long, help = format!(
        "Workload API socket path (absolute) [default: {DEFAULT_SOCKET_PATH}]"
    ))]
    pub socket_path: Option<PathBuf>,
    /// The node's identity [default: /var/lib/agentd/node as root, else
    /// ~/.local/share/agentd/node].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, value_name = "TTL", allow_hyphen_values = true, help = format!(
        "How often to sync with the server: seconds or a duration [default: {}s]",
        DEFAULT_SYNC_INTERVAL.as_secs()
    ))]
    pub sync_interval: Option<Ttl>,
    #[arg(long, value_name = "N", help = format!(
        "Mint an SVID for every entry ahead of any request while the node has at most N \
         entries; above that, only for entries a workload asked for [default: {}]",
        crate::node::config::DEFAULT_SVID_PREFETCH
    ))]
    pub svid_prefetch: Option<u64>,
    /// Serve /metrics, /live and /ready on HOST:PORT (port 0 picks a free one, logged).
    #[arg(long)]
    pub metrics_address: Option<String>,
    #[command(flatten)]
    pub log: LogArgs,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Creates a single-use join token; a node attested with it gets `--spiffe-id`.
    Generate {
        /// The SPIFFE ID the node that attests with the token gets.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime: seconds or a duration (90s, 5m, 8h) [default: the server's
        /// join_token_ttl, 10m unless configured].
        #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
        ttl: Option<Ttl>,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
}

/// `entry create`: the three fields every entry has, and the optional ones.
#[derive(Debug, Args)]
pub struct EntryCreateArgs {
    /// Creates every entry in FILE (- for stdin) instead: SPIRE's {"entries": [...]} JSON,
    /// or what `entry show --output json` prints; each entry is reported, and the exit
    /// status is 1 if any was not created.
    #[arg(long, value_name = "FILE", conflicts_with_all = [
        "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl",
        "scopes", "owner", "dns_names", "hint",
    ])]
    pub data: Option<String>,
    /// The workload's SPIFFE ID: in the server's trust domain, with a path.
    #[arg(long, required_unless_present = "data")]
    pub spiffe_id: Option<String>,
    /// The SPIFFE ID of the node agent that serves the entry (its join token's --spiffe-id),
    /// or of a node-set alias.
    #[arg(long, required_unless_present = "data")]
    pub parent_id: Option<String>,
    /// TYPE:VALUE, e.g. unix:uid:1000; repeat for several (all must match).
    #[arg(
        long = "selector",
        value_name = "TYPE:VALUE",
        required_unless_present = "data"
    )]
    pub selectors: Vec<String>,
    /// X.509-SVID lifetime: seconds or a duration [default: the server's
    /// default_x509_svid_ttl, 1h unless configured].
    #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
    pub x509_svid_ttl: Option<Ttl>,
    /// JWT-SVID lifetime: seconds or a duration [default: the server's default_jwt_svid_ttl,
    /// 5m unless configured].
    #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
    pub jwt_svid_ttl: Option<Ttl>,
    #[command(flatten)]
    pub options: EntryOptions,
}

/// `entry update`: only the fields given change.
#[derive(Debug, Args)]
pub struct EntryUpdateArgs {
    /// The entry's id.
    #[arg(long)]
    pub id: String,
    /// A new SPIFFE ID for the workload.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// A new parent: the node agent or node-set alias that serves the entry.
    #[arg(long)]
    pub parent_id: Option<String>,
    /// TYPE:VALUE; repeat for several. Replaces all the selectors.
    #[arg(long = "selector", value_name = "TYPE:VALUE")]
    pub selectors: Vec<String>,
    /// A new X.509-SVID lifetime: seconds or a duration.
    #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
    pub x509_svid_ttl: Option<Ttl>,
    /// A new JWT-SVID lifetime: seconds or a duration.
    #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
    pub jwt_svid_ttl: Option<Ttl>,
    #[command(flatten)]
    pub options: EntryOptions,
}

/// Entry fields that `entry create` and `entry update` take alike. With `update`, a list
/// given replaces the old one, and "" clears --owner and --hint.
#[derive(Debug, Args)]
pub struct EntryOptions {
    /// A tool/action permission, e.g. crm:read; repeat for several.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// The accountable human owner, e.g. alice@example.com.
    #[arg(long)]
    pub owner: Option<String>,
    /// A DNS name for the X.509-SVID's SANs (*. wildcards allowed); repeat for several.
    #[arg(long = "dns-name", value_name = "NAME")]
    pub dns_names: Vec<String>,
    /// The Workload API hint, telling a workload's identities apart (at most 1024 bytes).
    #[arg(long)]
    pub hint: Option<String>,
    /// A trust domain whose bundle the entry's workloads receive (it needs a federation
    /// relationship or a bundle set); repeat for several.
    #[arg(long = "federates-with", value_name = "TD")]
    pub federates_with: Vec<String>,
    /// A URL prefix of the tool servers (RFC 8707 resources) the entry may get OAuth
    /// access tokens for, e.g. https://tools.example/mcp; repeat for several; none: no
    /// tokens. With update, "" clears the list.
    #[arg(long = "resource", value_name = "URL_PREFIX")]
    pub resources: Vec<String>,
}

/// The filters of `entry show` and `entry list`: an entry must match every one given.
#[derive(Debug, Args)]
pub struct EntryFilterArgs {
    /// Only entries with this SPIFFE ID.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Only entries with this parent ID.
    #[arg(long)]
    pub parent_id: Option<String>,
    /// Only entries with this selector (TYPE:VALUE).
    #[arg(long)]
    pub selector: Option<String>,
    /// Only entries whose accountable owner is this one.
    #[arg(long)]
    pub owner: Option<String>,
    /// Only zombies: entries none of whose SVIDs was fetched within this window (e.g. 30d).
    #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
    pub stale: Option<Ttl>,
    /// Only entries without an owner or whose owner is disabled.
    #[arg(long)]
    pub orphaned: bool,
}

#[derive(Debug, Subcommand)]
pub enum EntryCommand {
    /// Creates an entry and prints its id, or every entry in --data.
    Create {
        #[command(flatten)]
        args: EntryCreateArgs,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Shows one entry (--id), or lists the entries matching the filters (all without any).
    Show {
        /// The entry's id.
        #[arg(long, conflicts_with_all = ["spiffe_id", "parent_id", "selector", "owner", "stale", "orphaned"])]
        id: Option<String>,
        #[command(flatten)]
        filter: EntryFilterArgs,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Lists the entries matching the filters, or all entries (as `entry show` without --id).
    List {
        #[command(flatten)]
        filter: EntryFilterArgs,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Updates the given fields of an entry; lists given replace the old ones.
    Update {
        #[command(flatten)]
        args: EntryUpdateArgs,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Deletes an entry, or every entry whose id is in --data.
    Delete {
        /// The entry's id.
        #[arg(long, required_unless_present = "data")]
        id: Option<String>,
        /// Deletes the entries in FILE (- for stdin) instead, by their "id": what
        /// `entry show --output json` prints; the exit status is 1 if any was not deleted.
        #[arg(long, value_name = "FILE", conflicts_with = "id")]
        data: Option<String>,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Prints the trust bundle.
    Show {
        /// pem: the X.509 authorities; spiffe: the SPIFFE bundle (JWKS, X.509 and JWT keys).
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Prints the CRL of each CA authority (PEM, RFC 5280), listing its unexpired revoked
    /// serials.
    Crl {
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Sets the bundle of another trust domain by hand (replacing what is held for it).
    Set {
        /// The other trust domain, e.g. partner.example.
        #[arg(long)]
        trust_domain: String,
        /// pem: CA certificates; spiffe: a SPIFFE bundle document.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
        /// The file to read, or - for stdin.
        #[arg(long)]
        path: PathBuf,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Lists the bundles held for other trust domains.
    List {
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Deletes the bundle of another trust domain (refused while a federation relationship
    /// or an entry uses it).
    Delete {
        /// The other trust domain whose bundle goes.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EndpointProfileArg {
    #[value(name = "https_spiffe")]
    HttpsSpiffe,
    #[value(name = "https_web")]
    HttpsWeb,
}

impl EndpointProfileArg {
    pub fn name(self) -> &'static str {
        match self {
            Self::HttpsSpiffe => "https_spiffe",
            Self::HttpsWeb => "https_web",
        }
    }
}

/// Where a federated trust domain's bundle comes from.
#[derive(Debug, Args)]
pub struct FederationArgs {
    /// The other trust domain, e.g. partner.example.
    #[arg(long)]
    pub trust_domain: String,
    /// Its bundle endpoint, https://HOST:PORT[/PATH].
    #[arg(long)]
    pub bundle_endpoint_url: Option<String>,
    /// How the endpoint is authenticated.
    #[arg(long, value_enum)]
    pub bundle_endpoint_profile: Option<EndpointProfileArg>,
    /// https_spiffe: the SPIFFE ID the endpoint presents [default:
    /// spiffe://TD/agentd/server; a SPIRE server is spiffe://TD/spire/server].
    #[arg(long)]
    pub endpoint_spiffe_id: Option<String>,
    /// The trust domain's bundle to start from (https_spiffe authenticates the first fetch
    /// with it); - for stdin.
    #[arg(long)]
    pub trust_bundle: Option<PathBuf>,
    /// The format of --trust-bundle: pem (CA certificates) or spiffe (a bundle document).
    #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
    pub trust_bundle_format: BundleFormat,
}

#[derive(Debug, Subcommand)]
pub enum FederationCommand {
    /// Creates a relationship: the server fetches the trust domain's bundle from its bundle
    /// endpoint at once and then at its refresh hint.
    Create {
        #[command(flatten)]
        args: FederationArgs,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Lists the relationships, with the bundle held and the last fetch.
    List {
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Shows one relationship.
    Show {
        /// The other trust domain.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Changes a relationship; what is not given stays.
    Update {
        #[command(flatten)]
        args: FederationArgs,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Deletes a relationship (the bundle last fetched is kept: `bundle delete` removes it).
    Delete {
        /// The other trust domain.
        #[arg(long)]
        trust_domain: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Why: kept in the revocation log and shown to relying parties.
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub admin: AdminSocketArg,
}

#[derive(Debug, Subcommand)]
pub enum RevokeCommand {
    /// An entry: its SVIDs are dropped everywhere and none is issued until the revocation is
    /// lifted or the entry deleted.
    Entry {
        /// The entry's id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// One SVID by serial (hex, as `agentd svid inspect` or openssl print it); the workload
    /// receives a fresh one. A JWT-SVID's jti is accepted too.
    Svid {
        /// The SVID's serial in hex, or a JWT-SVID's jti.
        #[arg(long)]
        serial: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// A node (kill switch): its node SVID stops working, every SVID it obtained is
    /// revoked, and it may not attest again until the revocation is lifted or a new join
    /// token is generated for it.
    Node {
        /// The node's SPIFFE ID, as `node list` prints it.
        #[arg(long)]
        spiffe_id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// A grant, and every SVID and grant derived from it.
    Grant {
        /// The grant's id.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// A task: every SVID issued for it.
    Task {
        /// The task id, as given to `grant create --task`.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// A CA authority (not the active one): dropped from the bundle, everything it signed
    /// is re-issued.
    Authority {
        /// The authority's id, as `authority list` prints it.
        #[arg(long)]
        id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// Lists standing revocations (with --all, every event still kept, lifts included).
    List {
        /// Every event still kept, lifts included.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
    /// Ends a standing revocation.
    Lift {
        /// The revocation's sequence number, as `revoke` and `revoke list` print it.
        #[arg(long)]
        sequence: u64,
        /// Why: kept in the revocation log.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        admin: AdminSocketArg,
    },
}

#[derive(Debug, Args)]
pub struct SocketArg {
    /// Workload API socket: a path, unix:///path or unix:/path. Default:
    /// $SPIFFE_ENDPOINT_SOCKET, then /tmp/agentd-node/public/api.sock.
    #[arg(long, env = connect::WORKLOAD_SOCKET_ENV, default_value = DEFAULT_SOCKET_PATH)]
    pub socket_path: String,
}

#[derive(Debug, Subcommand)]
pub enum ApiCommand {
    /// Fetches SVIDs from the Workload API.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validates a token through the Workload API.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Streams X.509-SVID updates until interrupted.
    Watch(SocketArg),
    /// Shows the selectors this process is attested with, and the identities they match.
    Selectors(SocketArg),
    /// Revocations the node agent has applied (for relying parties); --follow keeps
    /// printing new ones (one JSON value per line with --output json).
    Revocations {
        /// Only events after this sequence.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep printing new events until interrupted.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Hands part of this workload's grant to another agent: prints a single-use token.
    Delegate {
        /// The receiving agent's SPIFFE ID.
        #[arg(long)]
        to: String,
        /// A scope to hand on (within the grant's); repeat for several.
        #[arg(long = "scope", value_name = "SCOPE", required = true)]
        scopes: Vec<String>,
        /// Lifetime: seconds or a duration [default: as long as the grant].
        #[arg(long, value_name = "TTL", allow_hyphen_values = true)]
        ttl: Option<Ttl>,
        /// The grant to delegate from (default: the only one this workload holds).
        #[arg(long)]
        grant: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Redeems a delegation token addressed to this workload; prints the new grant.
    Exchange {
        /// The delegation token, as `api delegate` printed it.
        #[arg(long)]
        token: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum FetchCommand {
    /// X.509-SVIDs; --write DIR stores svid.N.pem, svid.N.key and bundle.N.pem.
    X509 {
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory (created if
        /// needed).
        #[arg(long)]
        write: Option<PathBuf>,
        /// With --write: also store the trust domain's CRLs as crl.pem (RFC 5280, one per CA
        /// authority), for relying parties that check revocation through CRLs.
        #[arg(long, requires = "write")]
        crl: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// A JWT-SVID for an audience.
    Jwt {
        /// An audience the JWT-SVID is for; repeat for several.
        #[arg(long, required = true)]
        audience: Vec<String>,
        /// Only the identity with this SPIFFE ID [default: every identity of the caller].
        #[arg(long, conflicts_with = "grant")]
        spiffe_id: Option<String>,
        /// A delegated JWT-SVID for this grant (agentd.workload.v1.Delegation).
        #[arg(long)]
        grant: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ValidateCommand {
    /// Validates a JWT-SVID for an audience.
    Jwt {
        /// The audience the token must name.
        #[arg(long)]
        audience: String,
        /// The JWT-SVID to validate.
        #[arg(long)]
        svid: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// Check the server through its admin socket instead of a node agent.
    #[arg(long, conflicts_with = "metrics_address")]
    pub admin_socket: Option<PathBuf>,
    /// Check either daemon's readiness on its metrics endpoint (GET /ready), HOST:PORT.
    #[arg(long)]
    pub metrics_address: Option<String>,
    /// Check a node agent on this Workload API socket: a path, unix:///path or unix:/path.
    #[arg(long, env = connect::WORKLOAD_SOCKET_ENV, default_value = DEFAULT_SOCKET_PATH)]
    pub socket_path: String,
}

#[derive(Debug, Subcommand)]
pub enum AuthorityCommand {
    /// Lists the X.509 and JWT authorities with their state (prepared, active, old).
    List(AdminSocketArg),
    /// Prepares the next X.509 CA and JWT key: published in the bundle, not signing yet.
    Prepare(AdminSocketArg),
    /// Activates the prepared authorities: they sign from now on; the previous ones become
    /// old and stay in the bundle until they expire.
    Activate(AdminSocketArg),
}

/// Runs a parsed command line.
impl Cli {
    /// The blocking-pool cap of the process's runtime, when the command wants one: the node
    /// agent attests each Workload API call on the blocking pool, which tokio would grow to
    /// one thread per concurrent call (hundreds, each with its stack); capped, calls beyond
    /// the cap wait for a thread instead.
    pub fn max_blocking_threads(&self) -> Option<usize> {
        matches!(self.command, Command::Node(NodeCommand::Run(_)))
            .then_some(crate::node::MAX_BLOCKING_THREADS)
    }
}

/// The command line of `agentd-node`, the node-only build of the same program: `run` is
/// `agentd node run` and `healthcheck` is `agentd healthcheck`, with the same flags. It is
/// what a node host installs (as SPIRE ships `spire-agent` apart from `spire-server`): the
/// linker keeps only the code these two commands reach, so the server, its stores, the CA
/// and the console are not in it. That is about half the text the node agent maps, which is
/// most of its resident memory (docs/PERFORMANCE.md, (d)), and none of the server's code on
/// the hosts whose workloads it serves.
#[derive(Debug, Parser)]
#[command(
    name = "agentd-node",
    version,
    about = "The agentd node agent alone: serves the SPIFFE Workload API on this host"
)]
pub struct NodeCli {
    /// Output format for commands that print data.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(subcommand)]
    pub command: NodeCliCommand,
}

// Parsed once per process; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum NodeCliCommand {
    /// Runs the node agent (the same as `agentd node run`).
    Run(NodeRunArgs),
    /// Checks that a node agent (socket) or the server (admin socket) is up and ready (the
    /// same as `agentd healthcheck`).
    Healthcheck(HealthcheckArgs),
}

impl NodeCli {
    /// The blocking-pool cap of the process's runtime (see [`Cli::max_blocking_threads`]).
    pub fn max_blocking_threads(&self) -> Option<usize> {
        matches!(self.command, NodeCliCommand::Run(_)).then_some(crate::node::MAX_BLOCKING_THREADS)
    }
}

/// Runs a parsed `agentd-node` command line.
pub async fn run_node_cli(cli: NodeCli) -> anyhow::Result<()> {
    match cli.command {
        NodeCliCommand::Run(args) => daemon::node_run(args).await,
        NodeCliCommand::Healthcheck(args) => healthcheck(&args, cli.output).await,
    }
}

/// What both binaries' `main` do: parse the command line (clap prints `--help`, `--version`
/// and usage errors itself), build the runtime (with `max_blocking` threads at most on its
/// blocking pool, when given), run the command, and print its error as one line.
pub fn main_of<P, F, Fut>(
    max_blocking: impl FnOnce(&P) -> Option<usize>,
    run: F,
) -> std::process::ExitCode
where
    P: Parser,
    F: FnOnce(P) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use std::process::ExitCode;
    let cli = match P::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version (stdout, exit 0), or a usage error: clap's whole message,
            // which names the argument, lists the valid values and suggests close matches
            // (stderr, exit 2).
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = max_blocking(&cli) {
        runtime.max_blocking_threads(n);
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One clear line on stderr.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `healthcheck`, in either binary.
async fn healthcheck(args: &HealthcheckArgs, out: Output) -> anyhow::Result<()> {
    match (&args.admin_socket, &args.metrics_address) {
        (Some(p), _) => admin::healthcheck(p, out).await,
        (None, Some(a)) => http_healthcheck(a, out).await,
        (None, None) => workload::healthcheck(&args.socket_path, out).await,
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = cli.output;
    match cli.command {
        Command::Server(ServerCommand::Run(args)) => daemon::server_run(args).await,
        Command::Server(ServerCommand::Migrate(args)) => daemon::server_migrate(args, out).await,
        Command::Node(NodeCommand::Run(args)) => daemon::node_run(args).await,
        Command::Node(cmd) => admin::node(cmd, out).await,
        Command::Token(cmd) => admin::token(cmd, out).await,
        Command::Entry(cmd) => admin::entry(cmd, out).await,
        Command::Bundle(cmd) => admin::bundle(cmd, out).await,
        Command::Federation(cmd) => federation::federation(cmd, out).await,
        Command::Revoke(cmd) => revoke::revoke(cmd, out).await,
        Command::Api(cmd) => workload::api(cmd, out).await,
        Command::Healthcheck(args) => healthcheck(&args, out).await,
        Command::Grant(cmd) => delegation::grant(cmd, out).await,
        Command::Svid(cmd) => delegation::svid(cmd, out),
        Command::Audit(cmd) => audit::audit(cmd, out).await,
        Command::Owner(cmd) => audit::owner(cmd, out).await,
        Command::Inventory { stale, admin } => audit::inventory(stale, &admin, out).await,
        Command::Authority(cmd) => admin::authority(cmd, out).await,
        Command::Console(args) => console::run(args).await,
    }
}

/// `healthcheck --metrics-address`: GET /ready on a daemon's metrics endpoint.
async fn http_healthcheck(raw: &str, out: Output) -> anyhow::Result<()> {
    let addr = crate::telemetry::parse_metrics_address(raw)
        .map_err(|e| anyhow::anyhow!("--metrics-address: {e}"))?;
    let (status, body) = crate::telemetry::endpoint::get(addr, "/ready")
        .await
        .map_err(|e| anyhow::anyhow!("{e} (is the daemon running with --metrics-address?)"))?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match status {
        200 => {
            out.print(&serde_json::json!({"healthy": true, "ready": true}), || {
                format!("Ready ({addr})")
            });
            Ok(())
        }
        503 => {
            let unmet: Vec<&str> = v["unmet"]
                .as_array()
                .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
                .unwrap_or_default();
            Err(anyhow::anyhow!(
                "not ready: waiting for {}",
                unmet.join(", ")
            ))
        }
        other => Err(anyhow::anyhow!(
            "{addr}/ready answered HTTP {other}: is this an agentd metrics endpoint?"
        )),
    }
}
