//! Command line: every flag also reads a `CDP_*` environment variable.

use clap::{Args, Parser, Subcommand};

use cdp_archiver::{ArchiverArgs, StoreArgs};
use cdp_erasure::{ErasureApiArgs, ErasureArgs};
use cdp_identity::{IdentityApiArgs, IdentityArgs};
use cdp_ingest::config::IngestArgs;
use cdp_keystore::config::KeyArgs;
use cdp_projector::{ApiArgs, ProjectorArgs};
use cdp_runtime::config::{AdminArgs, KafkaArgs, PostgresArgs, RunnerArgs, TelemetryArgs};

/// Services `cdp all` runs in one process. Grows as services arrive.
pub const SERVICES: &[&str] = &[
    "ingest",
    "projector",
    "api",
    "archiver",
    "identity",
    "erasure",
];

#[derive(Parser, Debug)]
#[command(
    name = "cdp",
    version,
    about = "An event-sourced Customer Data Platform over a Kafka log",
    long_about = "An event-sourced Customer Data Platform over a Kafka log.\n\n\
        The Kafka log is the source of truth; every other store is a projection that can be \
        rebuilt by replaying it. Every flag can also be set with the environment variable \
        shown in its help."
)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the biggest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Kafka topics of the catalogue.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Dead letters: records a consumer could not process, by failure kind; re-drive them
    /// after a fix.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Apply the Postgres migrations (idempotent).
    Migrate {
        #[command(flatten)]
        pg: PostgresArgs,
    },
    /// The Avro event contract.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Run the platform in one process: create missing topics, migrate, serve the admin
    /// endpoints and every service (ingest, projector, profile API, archiver, identity
    /// resolution, the erasure processor), until SIGINT/SIGTERM.
    All {
        #[command(flatten)]
        args: IngestCommand,
        #[command(flatten)]
        runner: RunnerArgs,
        #[command(flatten)]
        projector: ProjectorArgs,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        archiver: ArchiverArgs,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        identity: IdentityArgs,
        #[command(flatten)]
        identity_api: IdentityApiArgs,
        #[command(flatten)]
        erasure: ErasureArgs,
        #[command(flatten)]
        erasure_api: ErasureApiArgs,
    },
    /// File a GDPR erasure request for one person: the identifiers given (normalized like
    /// ingest does and looked up in the identifier vault) and profile ids, and everything
    /// identity linked to them. The erasure processor (`cdp erasure`) executes it.
    Erase {
        #[command(flatten)]
        args: ErasureCommand,
        #[command(flatten)]
        person: PersonArgs,
        /// A profile id to erase (repeatable).
        #[arg(long = "profile")]
        profiles: Vec<uuid::Uuid>,
        /// Who asks (an operator or system; kept in the request table, never on a topic).
        #[arg(long, env = "CDP_REQUESTED_BY")]
        requested_by: String,
        /// Why (free text: kept in the request table, never on a topic).
        #[arg(long)]
        reason: Option<String>,
        /// Erase without suppressing: events carrying the identifiers are accepted again
        /// afterwards (as a new, unlinked person).
        #[arg(long)]
        no_suppress: bool,
        /// Erase a cluster larger than CDP_ERASURE_MAX_PROFILES.
        #[arg(long)]
        force: bool,
        /// Wait up to this many seconds for the request to complete and print its report
        /// (0: return once filed).
        #[arg(long, default_value_t = 0)]
        wait: u64,
    },
    /// The erasure processor (its own consumer group on the compliance topic); with a
    /// subcommand, the state of requests or lifting a suppression.
    Erasure {
        #[command(flatten)]
        args: ErasureCommand,
        #[command(subcommand)]
        action: Option<ErasureAction>,
    },
    /// Identity resolution and event dedup: the identity graph, the identity topic and the
    /// resolved-events stream; with a subcommand, operator actions on the graph.
    Identity {
        #[command(flatten)]
        args: IdentityCommand,
        #[command(subcommand)]
        action: Option<IdentityAction>,
    },
    /// The archiver: every event and compliance topic into Avro container files on a local
    /// directory or S3, gapless across crashes (its positions are the archive itself).
    Archive {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        runner: RunnerArgs,
        #[command(flatten)]
        archiver: ArchiverArgs,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Produce archived records back into a topic (original keys, values, headers and
    /// timestamps; same partition numbers; offset order). The target must be empty.
    Restore {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        store: StoreArgs,
        /// The archived topic (full name, with its prefix).
        #[arg(long)]
        topic: String,
        /// Only this partition.
        #[arg(long)]
        partition: Option<i32>,
        /// Only records with a timestamp at or after this RFC 3339 time.
        #[arg(long)]
        from: Option<String>,
        /// Only records with a timestamp before this RFC 3339 time.
        #[arg(long)]
        to: Option<String>,
        /// The topic to produce into (created with the archived partition count if missing).
        #[arg(long)]
        into: String,
        /// Allow a target partition that already holds records.
        #[arg(long)]
        allow_nonempty: bool,
    },
    /// The projector: events into the Postgres read models (effectively once), and profile
    /// snapshots onto the profiles topic.
    Project {
        #[command(flatten)]
        args: ProjectCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The profile API (read role) over the read models.
    Api {
        #[command(flatten)]
        pg: PostgresArgs,
        #[command(flatten)]
        admin: AdminArgs,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        projector: ProjectorArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Rebuild a service's state from the log, or move its stored positions.
    Replay {
        #[command(subcommand)]
        service: ReplayCommand,
    },
    /// Print a content digest of the live read models (equal digests: equal tables).
    Digest {
        #[command(flatten)]
        pg: PostgresArgs,
        #[command(flatten)]
        projector: ProjectorArgs,
    },
    /// The ingest service: the Segment-compatible tracking API and native events, into Kafka.
    Ingest {
        #[command(flatten)]
        args: IngestCommand,
    },
    /// Print the most recent events the ingest API rejected (JSON lines, newest first).
    Rejections {
        #[command(flatten)]
        pg: PostgresArgs,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

/// What the ingest service needs (also `cdp all`, which runs it).
#[derive(Args, Debug)]
pub struct IngestCommand {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub pg: PostgresArgs,
    #[command(flatten)]
    pub admin: AdminArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub ingest: IngestArgs,
}

/// What the projector needs.
#[derive(Args, Debug)]
pub struct ProjectCommand {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub pg: PostgresArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub runner: RunnerArgs,
    #[command(flatten)]
    pub projector: ProjectorArgs,
}

/// What the erasure processor and its commands need.
#[derive(Args, Debug)]
pub struct ErasureCommand {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub pg: PostgresArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub runner: RunnerArgs,
    #[command(flatten)]
    pub erasure: ErasureArgs,
    #[command(flatten)]
    pub api: ErasureApiArgs,
    /// API tokens, `principal:role:secret` comma-separated; the `compliance` role files and
    /// reads erasure requests. Secret.
    #[arg(
        long = "api-tokens",
        env = "CDP_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true,
        default_value = ""
    )]
    pub api_tokens: Vec<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// A person by identifiers, as clients send them (each flag repeatable).
#[derive(Args, Debug, Clone)]
pub struct PersonArgs {
    /// An email address, as the person gave it (trimmed and lower-cased as ingest does).
    #[arg(long)]
    pub email: Vec<String>,
    /// A phone number (E.164, or national in CDP_DEFAULT_PHONE_REGION; normalized to E.164).
    #[arg(long)]
    pub phone: Vec<String>,
    /// An app's user id (Segment's userId).
    #[arg(long = "user-id")]
    pub user_id: Vec<String>,
    /// An anonymous id (Segment's anonymousId).
    #[arg(long = "anonymous-id")]
    pub anonymous_id: Vec<String>,
    /// A device id.
    #[arg(long = "device-id")]
    pub device_id: Vec<String>,
    /// `NAMESPACE:VALUE`, e.g. `salesforce:0035e00000ABC`.
    #[arg(long = "external-id")]
    pub external_id: Vec<String>,
}

impl PersonArgs {
    /// The identifiers, in flag order.
    pub fn identifiers(&self) -> Result<Vec<cdp_keystore::RawIdentifier>, String> {
        use cdp_keystore::RawIdentifier;
        use cdp_schemas::IdentifierKind as K;
        let mut out = Vec::new();
        for (kind, values) in [
            (K::Email, &self.email),
            (K::Phone, &self.phone),
            (K::UserId, &self.user_id),
            (K::AnonymousId, &self.anonymous_id),
            (K::DeviceId, &self.device_id),
        ] {
            out.extend(values.iter().map(|v| RawIdentifier::new(kind, v.clone())));
        }
        for e in &self.external_id {
            let (ns, v) = e
                .split_once(':')
                .ok_or_else(|| "--external-id takes NAMESPACE:VALUE".to_owned())?;
            out.push(RawIdentifier {
                kind: K::ExternalId,
                namespace: Some(ns.to_owned()),
                value: v.to_owned(),
            });
        }
        Ok(out)
    }
}

#[derive(Subcommand, Debug)]
pub enum ErasureAction {
    /// Erasure requests, newest first, with their state, counts and each service's answer.
    Status {
        /// One request.
        id: Option<uuid::Uuid>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Search every store for what a completed request erased and print a report for the
    /// compliance team: every Postgres table, every record of the platform's topics and
    /// every archive file. Exits 0 only when nothing is left where it must not be.
    Verify {
        id: uuid::Uuid,
        /// Also search this topic (a restored copy, say) as an event topic; repeatable.
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Do not search the archive (the report says it was not searched and is not clean).
        #[arg(long)]
        no_archive: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Lift the suppression of identifiers: events carrying them are accepted again, as a
    /// new person who shares nothing with the erased one.
    Unsuppress {
        #[command(flatten)]
        person: PersonArgs,
    },
}

/// What the identity service needs.
#[derive(Args, Debug)]
pub struct IdentityCommand {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub pg: PostgresArgs,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub runner: RunnerArgs,
    #[command(flatten)]
    pub identity: IdentityArgs,
    #[command(flatten)]
    pub api: IdentityApiArgs,
    /// API tokens, `principal:role:secret` comma-separated; the `operator` role reads the
    /// identity graph. Secret.
    #[arg(
        long = "api-tokens",
        env = "CDP_API_TOKENS",
        value_delimiter = ',',
        hide_env_values = true,
        default_value = ""
    )]
    pub api_tokens: Vec<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Subcommand, Debug)]
pub enum IdentityAction {
    /// Remove one bad link, or an identifier, and re-derive the profiles it joined from the
    /// remaining links (ProfileSplit events on the identity topic; the projector follows).
    /// Rules and keys come from the same settings as the service's.
    Split {
        /// `link:<link id>`, `<kind>:<value>` (normalized like ingest does and looked up in
        /// the identifier vault, e.g. `email:test@example.com`), or `<kind>:token:<hex>` as
        /// the identity API shows it.
        target: cdp_identity::SplitTarget,
        /// Why (kept with the severance).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Score fuzzy duplicate candidates now (names, streets and birth dates of profiles sharing
    /// a postal code, from the projector's read model) and, with CDP_IDENTITY_AUTOMERGE set,
    /// publish the merges that meet it. The service also sweeps every
    /// CDP_IDENTITY_CANDIDATES_EVERY seconds.
    Candidates,
}

/// How to move a consumer's stored positions.
#[derive(Args, Debug, Clone)]
pub struct MoveArgs {
    /// Show the current and target offset of every partition and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Move even while the group has live members (they may overwrite the move).
    #[arg(long)]
    pub force: bool,
}

#[derive(Subcommand, Debug)]
pub enum ReplayCommand {
    /// The projector. `--from` rebuilds the read models from the log into a fresh schema and
    /// swaps it in atomically once caught up (readers never see a half-built model; a
    /// running projector follows). `--to` moves the live projector's stored offsets in
    /// Postgres instead (re-applying is harmless: every write is idempotent).
    #[command(group = clap::ArgGroup::new("how").required(true).args(["from", "to"]))]
    Projector {
        #[command(flatten)]
        args: ProjectCommand,
        /// `earliest` (rebuild from nothing), an RFC 3339 time, or `topic:partition:offset,...`
        /// (start from a copy of the live models and re-apply from there).
        #[arg(long)]
        from: Option<String>,
        /// `earliest`, `latest`, an RFC 3339 time, or `[topic:]partition:offset,...`.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        how: MoveArgs,
    },
    /// Any consumer group whose positions are Kafka committed offsets (consumers outside
    /// the platform, such as subscribers of the profiles topic).
    Group {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// The consumer group.
        group: String,
        /// Topics whose offsets to move (full names), comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        topics: Vec<String>,
        /// `earliest`, `latest`, an RFC 3339 time, or `[topic:]partition:offset,...`.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        how: MoveArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum TopicsCommand {
    /// Create the catalogue's missing topics with their partitions, cleanup policy and retention.
    Create {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Print the topic catalogue.
    List {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
}

/// Which dead letters a `cdp dlq` command acts on.
#[derive(clap::Args, Debug)]
pub struct DlqFilter {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Only letters of this consumer group.
    #[arg(long)]
    pub group: Option<String>,
    /// Only letters of this failure kind: the decoder's (`too_short`, `bad_magic`,
    /// `unknown_fingerprint`, `corrupt_avro`, `unresolvable`, `contract`, ...), a handler's
    /// (`invalid`, ...), `refused_by_database`: the `kind` column of `cdp dlq list`.
    #[arg(long)]
    pub kind: Option<String>,
    /// Only letters of records from this topic (full name).
    #[arg(long)]
    pub topic: Option<String>,
    /// Only letters written at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters (once per original record): when, which group, the original
    /// topic:partition:offset, the failure kind and reason. Prints no record content.
    List {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Count dead letters per group, topic and kind.
    Summary {
        #[command(flatten)]
        filter: DlqFilter,
    },
    /// Produce the matching records again onto their original topic and partition (key,
    /// value, headers, timestamp as they were, plus cdp.dlq.redriven-from). Consumers that
    /// applied a record before recognise its event id; the group that dead-lettered it applies
    /// it now, or dead-letters it again if the cause is still there.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
        /// Print what would be re-driven, produce nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SchemasCommand {
    /// Print the event catalogue (Markdown) generated from the .avsc files.
    Catalog,
    /// List every schema version with its fingerprint.
    List,
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
