//! `cdp`: every service of the platform and the operator commands, in one binary.

mod cli;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use cdp_runtime::admin::{self, Readiness};
use cdp_runtime::metrics::Metrics;
use cdp_runtime::topics::{self, Ensured, Topic, Topics};
use cdp_runtime::{pg, telemetry, Shutdown};
use cli::{Cli, Command, DlqCommand, ReplayCommand, SchemasCommand, TopicsCommand};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.telemetry) {
        eprintln!("cdp: {e}");
        return std::process::ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cdp: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cdp failed");
            eprintln!("cdp: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn connect(args: &cdp_runtime::config::PostgresArgs) -> anyhow::Result<sqlx::PgPool> {
    pg::connect(args).await.with_context(|| {
        format!(
            "connecting to {}",
            cdp_runtime::config::redact_url(&args.database_url)
        )
    })
}

/// Every migration of every component (each migrator ignores the others' versions).
async fn migrate(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    pg::migrator()
        .run(pool)
        .await
        .context("runtime migrations")?;
    cdp_ingest::migrate(pool)
        .await
        .context("ingest migrations")?;
    cdp_projector::migrate(pool)
        .await
        .context("projector migrations")?;
    Ok(())
}

type Service = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// What every service process shares: signals, metrics, readiness, the admin server.
struct Platform {
    shutdown: Shutdown,
    metrics: Metrics,
    readiness: Readiness,
    admin: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Platform {
    async fn start(admin_args: &cdp_runtime::config::AdminArgs) -> anyhow::Result<Self> {
        let shutdown = Shutdown::new();
        shutdown
            .listen_for_signals()
            .context("installing signal handlers")?;
        let metrics = Metrics::new();
        let readiness = Readiness::default();
        let (addr, serve) = admin::bind(
            admin_args.admin_addr,
            metrics.clone(),
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .with_context(|| format!("binding the admin server on {}", admin_args.admin_addr))?;
        tracing::info!(admin = %addr, "admin endpoints: /healthz /readyz /metrics");
        Ok(Self {
            shutdown,
            metrics,
            readiness,
            admin: tokio::spawn(serve),
        })
    }

    /// Runs the services until shutdown. The first to fail stops the others (and its error
    /// is returned); the others finish their in-flight work.
    async fn run(self, services: Vec<Service>) -> anyhow::Result<()> {
        let mut set = tokio::task::JoinSet::new();
        for s in services {
            let shutdown = self.shutdown.clone();
            set.spawn(async move {
                let r = s.await;
                shutdown.trigger();
                r
            });
        }
        let mut first: Option<anyhow::Error> = None;
        while let Some(joined) = set.join_next().await {
            let result = joined.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        self.shutdown.trigger();
        match self.admin.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "admin server"),
            Err(e) => tracing::warn!(error = %e, "admin server task"),
        }
        first.map_or(Ok(()), Err)
    }

    fn ingest(&self, config: cdp_ingest::IngestConfig) -> Service {
        let (m, r, s) = (
            self.metrics.clone(),
            self.readiness.clone(),
            self.shutdown.clone(),
        );
        Box::pin(async move { cdp_ingest::run(config, &m, &r, s).await.context("ingest") })
    }

    fn archiver(&self, config: cdp_archiver::ArchiverConfig) -> Service {
        let (m, r, s) = (
            self.metrics.clone(),
            self.readiness.clone(),
            self.shutdown.clone(),
        );
        Box::pin(async move {
            cdp_archiver::run(config, &m, &r, s)
                .await
                .context("archiver")
        })
    }

    fn projector(&self, config: cdp_projector::ProjectorConfig) -> Service {
        let (m, r, s) = (
            self.metrics.clone(),
            self.readiness.clone(),
            self.shutdown.clone(),
        );
        Box::pin(async move {
            cdp_projector::run(config, &m, &r, s)
                .await
                .context("projector")
        })
    }

    fn identity(&self, config: cdp_identity::IdentityConfig) -> Service {
        let (m, r, s) = (
            self.metrics.clone(),
            self.readiness.clone(),
            self.shutdown.clone(),
        );
        Box::pin(async move {
            cdp_identity::run(config, &m, &r, s)
                .await
                .context("identity")
        })
    }

    fn erasure(&self, config: cdp_erasure::ErasureConfig) -> Service {
        let (m, r, s) = (
            self.metrics.clone(),
            self.readiness.clone(),
            self.shutdown.clone(),
        );
        Box::pin(async move {
            cdp_erasure::run(config, &m, &r, s)
                .await
                .context("erasure processor")
        })
    }

    /// The erasures API, unless its address is `off`.
    async fn erasure_api(
        &self,
        config: &cdp_erasure::ErasureConfig,
        api: &cdp_erasure::ErasureApiArgs,
        tokens: &[String],
    ) -> anyhow::Result<Option<Service>> {
        let Some((addr, serve)) = cdp_erasure::bind_api(config, api, tokens, self.shutdown.clone())
            .await
            .context("erasures API")?
        else {
            return Ok(None);
        };
        tracing::info!(%addr, "erasures API listening");
        Ok(Some(Box::pin(async move {
            serve.await.context("erasures API")
        })))
    }

    /// The identity API, unless its address is `off`.
    async fn identity_api(
        &self,
        pg: &cdp_runtime::config::PostgresArgs,
        schema: &str,
        api: &cdp_identity::IdentityApiArgs,
        tokens: &[String],
    ) -> anyhow::Result<Option<Service>> {
        let Some((addr, serve)) =
            cdp_identity::bind_api(pg, schema, api, tokens, self.shutdown.clone())
                .await
                .context("identity API")?
        else {
            return Ok(None);
        };
        tracing::info!(%addr, "identity API listening");
        Ok(Some(Box::pin(async move {
            serve.await.context("identity API")
        })))
    }

    async fn api(
        &self,
        pg: &cdp_runtime::config::PostgresArgs,
        keys: &cdp_keystore::config::KeyArgs,
        prefix: &str,
        api: &cdp_projector::ApiArgs,
    ) -> anyhow::Result<Service> {
        let (addr, serve) = cdp_projector::bind_api(pg, keys, prefix, api, self.shutdown.clone())
            .await
            .context("profile API")?;
        tracing::info!(%addr, "profile API listening");
        Ok(Box::pin(async move { serve.await.context("profile API") }))
    }
}

fn erasure_config(args: &cli::ErasureCommand) -> cdp_erasure::ErasureConfig {
    cdp_erasure::ErasureConfig {
        kafka: args.kafka.clone(),
        pg: args.pg.clone(),
        keys: args.keys.clone(),
        runner: args.runner.clone(),
        erasure: args.erasure.clone(),
    }
}

/// Prints a verification report as `cdp erasure verify` shows it (`archive`: the location
/// searched, if it was).
fn print_report(r: &cdp_erasure::verify::Report, archive: Option<&str>) {
    println!("erasure verification, {}", chrono::Utc::now().to_rfc3339());
    println!("request      {}", r.request_id);
    println!(
        "searched for {} tokens and {} profile ids (as text and as bytes)",
        r.tokens, r.profiles
    );
    println!(
        "postgres     {} tables in every schema of the database",
        r.tables_searched
    );
    for (table, (n, why)) in &r.by_design {
        println!("  by design  {table}: {n} rows ({why})");
    }
    println!("  live keys  {}", r.live_keys);
    if r.found.is_empty() {
        println!("  found      nothing");
    }
    for (table, n) in &r.found {
        println!("  FOUND      {table}: {n} rows");
    }
    for s in &r.stores {
        println!(
            "{:<12} {} records; {} name the person's tokens; {} sealed values, {} still open{}",
            s.store,
            s.records,
            s.naming,
            s.sealed,
            s.openable,
            match s.kind {
                cdp_erasure::verify::Kind::Compacted =>
                    format!("; latest record of a key naming them: {}", s.found),
                cdp_erasure::verify::Kind::Nowhere => format!("; FOUND: {}", s.found),
                _ => String::new(),
            }
        );
    }
    match archive {
        None => println!("archive      NOT SEARCHED (--no-archive)"),
        Some(url) if !r.stores.iter().any(|s| s.store.starts_with("archive ")) => {
            println!("archive      {url}: no file of the platform's topics (nothing archived yet)")
        }
        Some(_) => {}
    }
    println!(
        "result       {}",
        if r.clean() {
            "nothing of the person is left"
        } else {
            "NOT ERASED: rows above name the person"
        }
    );
}

/// Prints a request's state as `cdp erasure status` and `cdp erase --wait` show it.
fn print_status(s: &cdp_erasure::Status) {
    let opt = |v: Option<i64>| v.map_or("-".to_owned(), |n| n.to_string());
    println!("request      {}", s.request_id);
    println!(
        "state        {}{}",
        s.state,
        s.outcome
            .as_deref()
            .map(|o| format!(" ({o})"))
            .unwrap_or_default()
    );
    println!(
        "requested    {} by {}",
        s.requested_at.to_rfc3339(),
        s.requested_by
    );
    if let Some(reason) = &s.reason {
        println!("reason       {reason}");
    }
    println!("due          {}", s.due_at.to_rfc3339());
    if let Some(done) = s.completed_at {
        let ms = (done - s.requested_at).num_milliseconds();
        println!(
            "completed    {} ({ms} ms after the request)",
            done.to_rfc3339()
        );
    }
    println!(
        "cluster      {} profiles, {} tokens, {} refused links (not followed)",
        opt(s.profiles.map(i64::from)),
        opt(s.tokens.map(i64::from)),
        opt(s.refused_links)
    );
    println!(
        "key store    {} data keys destroyed, {} vault rows deleted, {} identifiers suppressed",
        opt(s.keys_destroyed),
        opt(s.vault_rows),
        opt(s.suppressed)
    );
    for a in &s.answers {
        let tables: Vec<String> = a.stores.iter().map(|(t, n)| format!("{t} {n}")).collect();
        println!(
            "{:<12} {} rows deleted, {} tombstones ({})",
            a.service,
            a.rows_deleted,
            a.tombstones,
            tables.join(", ")
        );
    }
    let waiting: Vec<&String> = s
        .awaiting
        .iter()
        .filter(|w| !s.answers.iter().any(|a| &a.service == *w))
        .collect();
    if s.state == "scoped" && !waiting.is_empty() {
        println!("awaiting     {waiting:?}");
    }
}

fn identity_config(args: &cli::IdentityCommand) -> cdp_identity::IdentityConfig {
    cdp_identity::IdentityConfig {
        kafka: args.kafka.clone(),
        pg: args.pg.clone(),
        keys: args.keys.clone(),
        runner: args.runner.clone(),
        identity: args.identity.clone(),
    }
}

fn ingest_config(args: &cli::IngestCommand) -> cdp_ingest::IngestConfig {
    cdp_ingest::IngestConfig {
        kafka: args.kafka.clone(),
        pg: args.pg.clone(),
        keys: args.keys.clone(),
        ingest: args.ingest.clone(),
    }
}

fn projector_config(args: &cli::ProjectCommand) -> cdp_projector::ProjectorConfig {
    cdp_projector::ProjectorConfig {
        kafka: args.kafka.clone(),
        pg: args.pg.clone(),
        keys: args.keys.clone(),
        runner: args.runner.clone(),
        projector: args.projector.clone(),
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Topics {
            command: TopicsCommand::Create { kafka },
        } => {
            let topics = Topics::new(&kafka.topic_prefix);
            let catalogue = topics::catalogue(&topics);
            for outcome in topics::ensure(&kafka, &catalogue).await? {
                match outcome {
                    Ensured::Created(t) => println!("created {t}"),
                    Ensured::Existed(t) => println!("exists  {t}"),
                }
            }
            Ok(())
        }
        Command::Topics {
            command: TopicsCommand::List { kafka },
        } => {
            let topics = Topics::new(&kafka.topic_prefix);
            println!(
                "{:<32} {:>10} {:>8} {:>14}  purpose",
                "topic", "partitions", "cleanup", "retention.ms"
            );
            for (name, spec) in topics::catalogue(&topics) {
                println!(
                    "{:<32} {:>10} {:>8} {:>14}  {}",
                    name,
                    spec.partitions,
                    format!("{:?}", spec.cleanup).to_lowercase(),
                    spec.retention_ms,
                    spec.purpose
                );
            }
            Ok(())
        }
        Command::Dlq { command } => dlq(command).await,
        Command::Migrate { pg: pg_args } => {
            let pool = connect(&pg_args).await?;
            migrate(&pool).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Rejections { pg: pg_args, limit } => {
            let pool = connect(&pg_args).await?;
            for r in cdp_ingest::rejections::recent(&pool, limit).await? {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        Command::Ingest { args } => {
            let platform = Platform::start(&args.admin).await?;
            let ingest = platform.ingest(ingest_config(&args));
            platform.run(vec![ingest]).await
        }
        Command::Project { args, admin } => {
            let platform = Platform::start(&admin).await?;
            let projector = platform.projector(projector_config(&args));
            platform.run(vec![projector]).await
        }
        Command::Api {
            pg: pg_args,
            admin,
            keys,
            projector,
            api,
        } => {
            let platform = Platform::start(&admin).await?;
            let api = platform
                .api(&pg_args, &keys, &projector.schema_prefix, &api)
                .await?;
            platform.run(vec![api]).await
        }
        Command::Archive {
            kafka,
            runner,
            archiver,
            store,
            admin,
        } => {
            let platform = Platform::start(&admin).await?;
            let archiver = platform.archiver(cdp_archiver::ArchiverConfig {
                kafka,
                runner,
                archiver,
                store,
            });
            platform.run(vec![archiver]).await
        }
        Command::Restore {
            kafka,
            store,
            topic,
            partition,
            from,
            to,
            into,
            allow_nonempty,
        } => {
            let time =
                |s: Option<String>| -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
                    s.map(|s| {
                        chrono::DateTime::parse_from_rfc3339(&s)
                            .map(|t| t.with_timezone(&chrono::Utc))
                            .with_context(|| format!("{s:?} is not an RFC 3339 time"))
                    })
                    .transpose()
                };
            let req = cdp_archiver::restore::RestoreRequest {
                topic,
                partition,
                from: time(from)?,
                to: time(to)?,
                into,
                allow_nonempty,
            };
            let archive = cdp_archiver::Archive::open(&store)?;
            restore(&kafka, &archive, &req).await
        }
        Command::Replay {
            service:
                ReplayCommand::Projector {
                    args,
                    from: None,
                    to: Some(to),
                    how,
                },
        } => {
            let target: cdp_runtime::replay::Target = to.parse()?;
            let Some((store, topics)) =
                cdp_projector::position_store(&projector_config(&args)).await?
            else {
                anyhow::bail!("no live projector generation: nothing to move (run the projector or `cdp replay projector --from earliest`)");
            };
            move_positions(&args.kafka, &store, &topics, &target, &how).await
        }
        Command::Replay {
            service:
                ReplayCommand::Group {
                    kafka,
                    group,
                    topics,
                    to,
                    how,
                },
        } => {
            let target: cdp_runtime::replay::Target = to.parse()?;
            let store = cdp_runtime::replay::PositionStore::Kafka { group };
            move_positions(&kafka, &store, &topics, &target, &how).await
        }
        Command::Replay {
            service: ReplayCommand::Projector { args, from, .. },
        } => {
            let from: cdp_projector::ReplayFrom = from.as_deref().unwrap_or("earliest").parse()?;
            let shutdown = Shutdown::new();
            shutdown
                .listen_for_signals()
                .context("installing signal handlers")?;
            let rebuilt = cdp_projector::rebuild(projector_config(&args), from, shutdown).await?;
            println!(
                "generation {} is live, digest {}",
                rebuilt.generation, rebuilt.digest
            );
            Ok(())
        }
        Command::Digest {
            pg: pg_args,
            projector,
        } => {
            match cdp_projector::live_digest(&pg_args, &projector.schema_prefix).await? {
                Some((total, tables)) => {
                    for (t, d, n) in tables {
                        println!("{t:<20} {n:>10} rows  {d}");
                    }
                    println!("digest {total}");
                }
                None => println!("no live generation"),
            }
            Ok(())
        }
        Command::Schemas {
            command: SchemasCommand::Catalog,
        } => {
            print!(
                "{}",
                cdp_schemas::catalog::markdown(&cdp_schemas::all_schemas())
            );
            Ok(())
        }
        Command::Schemas {
            command: SchemasCommand::List,
        } => {
            for set in cdp_schemas::all_schemas() {
                for v in set.versions() {
                    let current = if v.version == set.current().version {
                        " (current)"
                    } else {
                        ""
                    };
                    println!(
                        "{:<18} v{} {:016x} (legacy alias {:016x}){current}",
                        set.name, v.version, v.fingerprint, v.legacy_fingerprint
                    );
                }
            }
            Ok(())
        }
        Command::Identity { args, action } => {
            let config = identity_config(&args);
            match action {
                Some(cli::IdentityAction::Split { target, note }) => {
                    let r = cdp_identity::split(&config, target, &note)
                        .await
                        .context("split")?;
                    println!(
                        "split: {} identifiers and {} events re-derived, {} profiles now, {} ProfileSplit events queued",
                        r.rederived_nodes, r.rederived_events, r.profiles_after, r.splits
                    );
                    Ok(())
                }
                Some(cli::IdentityAction::Candidates) => {
                    let r = cdp_identity::sweep_candidates(&config)
                        .await
                        .context("duplicate candidates")?;
                    if r.swept {
                        println!(
                            "candidates: {} profiles with a name and postal code in {} blocks, {} open candidates, {} merged automatically",
                            r.profiles, r.blocks, r.candidates, r.merges
                        );
                    } else {
                        println!("candidates: another sweep is running; nothing done");
                    }
                    Ok(())
                }
                None => {
                    let platform = Platform::start(&args.admin).await?;
                    let mut services = vec![platform.identity(config)];
                    services.extend(
                        platform
                            .identity_api(
                                &args.pg,
                                &args.identity.schema,
                                &args.api,
                                &args.api_tokens,
                            )
                            .await?,
                    );
                    platform.run(services).await
                }
            }
        }
        Command::Erase {
            args,
            person,
            profiles,
            requested_by,
            reason,
            no_suppress,
            force,
            wait,
        } => {
            let config = erasure_config(&args);
            let request = cdp_erasure::Request {
                identifiers: person.identifiers().map_err(anyhow::Error::msg)?,
                profiles,
                requested_by,
                reason,
                suppress: !no_suppress,
                force,
            };
            let requests = cdp_erasure::Requests::open(&config).await?;
            let id = requests
                .file(&request)
                .await
                .context("filing the erasure request")?;
            println!("erasure request {id} filed");
            let done = if wait == 0 {
                None
            } else {
                requests.wait_final(id, Duration::from_secs(wait)).await?
            };
            requests.close().await;
            match done {
                Some(s) => print_status(&s),
                None if wait == 0 => {}
                None => anyhow::bail!(
                    "request {id} did not complete within {wait} s: is `cdp erasure` running? (`cdp erasure status {id}`)"
                ),
            }
            Ok(())
        }
        Command::Erasure { args, action } => {
            let config = erasure_config(&args);
            match action {
                None => {
                    let platform = Platform::start(&args.admin).await?;
                    let mut services = vec![platform.erasure(config.clone())];
                    services.extend(
                        platform
                            .erasure_api(&config, &args.api, &args.api_tokens)
                            .await?,
                    );
                    platform.run(services).await
                }
                Some(cli::ErasureAction::Status { id, limit }) => {
                    let requests = cdp_erasure::Requests::open(&config).await?;
                    let list = requests.status(id, limit).await;
                    requests.close().await;
                    for s in list? {
                        print_status(&s);
                        println!();
                    }
                    Ok(())
                }
                Some(cli::ErasureAction::Verify {
                    id,
                    topics,
                    no_archive,
                    store,
                }) => {
                    let requests = cdp_erasure::Requests::open(&config).await?;
                    let archive = (!no_archive).then_some(&store);
                    let report =
                        cdp::verify::erasure(&requests, &config, id, &topics, archive).await;
                    requests.close().await;
                    let report = report?;
                    print_report(&report, (!no_archive).then_some(store.archive_url.as_str()));
                    if no_archive {
                        anyhow::bail!("erasure request {id}: the archive was not searched");
                    }
                    if report.clean() {
                        Ok(())
                    } else {
                        anyhow::bail!("erasure request {id}: the person was found")
                    }
                }
                Some(cli::ErasureAction::Unsuppress { person }) => {
                    let ids = person.identifiers().map_err(anyhow::Error::msg)?;
                    let n = cdp_erasure::unsuppress(&config, &ids).await?;
                    println!("{n} suppression entries removed");
                    Ok(())
                }
            }
        }
        Command::All {
            args,
            runner,
            projector,
            api,
            archiver,
            store,
            identity,
            identity_api,
            erasure,
            erasure_api,
        } => {
            let topics = Topics::new(&args.kafka.topic_prefix);
            topics::ensure(&args.kafka, &topics::catalogue(&topics))
                .await
                .context("creating topics")?;
            migrate(&connect(&args.pg).await?).await?;
            let platform = Platform::start(&args.admin).await?;
            tracing::info!(services = ?cli::SERVICES, "cdp all running; Ctrl-C to stop");
            let project = projector_config(&cli::ProjectCommand {
                kafka: args.kafka.clone(),
                pg: args.pg.clone(),
                keys: args.keys.clone(),
                runner: runner.clone(),
                projector: projector.clone(),
            });
            let identity_config = cdp_identity::IdentityConfig {
                kafka: args.kafka.clone(),
                pg: args.pg.clone(),
                keys: args.keys.clone(),
                runner: runner.clone(),
                identity: identity.clone(),
            };
            let erasure_config = cdp_erasure::ErasureConfig {
                kafka: args.kafka.clone(),
                pg: args.pg.clone(),
                keys: args.keys.clone(),
                runner: runner.clone(),
                erasure,
            };
            let archive = cdp_archiver::ArchiverConfig {
                kafka: args.kafka.clone(),
                runner,
                archiver,
                store,
            };
            let mut services = vec![
                platform.identity(identity_config),
                platform.ingest(ingest_config(&args)),
                platform.projector(project),
                platform
                    .api(&args.pg, &args.keys, &projector.schema_prefix, &api)
                    .await?,
                platform.archiver(archive),
            ];
            services.extend(
                platform
                    .identity_api(&args.pg, &identity.schema, &identity_api, &api.api_tokens)
                    .await?,
            );
            services.extend(
                platform
                    .erasure_api(&erasure_config, &erasure_api, &api.api_tokens)
                    .await?,
            );
            services.push(platform.erasure(erasure_config));
            platform.run(services).await
        }
    }
}

/// Plans a move of stored positions, prints it, and applies it unless it is a dry run.
async fn move_positions(
    kafka: &cdp_runtime::config::KafkaArgs,
    store: &cdp_runtime::replay::PositionStore,
    topics: &[String],
    target: &cdp_runtime::replay::Target,
    how: &cli::MoveArgs,
) -> anyhow::Result<()> {
    let plan = cdp_runtime::replay::plan(kafka, store, topics, target).await?;
    let where_ = match store {
        cdp_runtime::replay::PositionStore::Postgres { .. } => "Postgres",
        cdp_runtime::replay::PositionStore::Kafka { .. } => "Kafka",
    };
    println!("group {} (positions in {where_})", plan.group);
    println!(
        "{:<40} {:>9} {:>12} {:>12} {:>12} {:>12}",
        "topic", "partition", "current", "target", "delta", "log end"
    );
    for m in &plan.moves {
        let current = m.current.map_or_else(|| "-".to_owned(), |c| c.to_string());
        let delta = m
            .current
            .map_or_else(|| "-".to_owned(), |c| format!("{:+}", m.target - c));
        println!(
            "{:<40} {:>9} {:>12} {:>12} {:>12} {:>12}",
            m.partition.topic, m.partition.partition, current, m.target, delta, m.watermarks.1
        );
    }
    if !plan.members.is_empty() {
        println!("live members: {}", plan.members.join(", "));
    }
    if how.dry_run {
        println!("dry run: nothing changed");
        return Ok(());
    }
    cdp_runtime::replay::apply(kafka, store, &plan, how.force).await?;
    println!("moved {} partition(s)", plan.moves.len());
    Ok(())
}

/// Runs a restore with a progress line on a terminal and a summary at the end.
async fn restore(
    kafka: &cdp_runtime::config::KafkaArgs,
    archive: &cdp_archiver::Archive,
    req: &cdp_archiver::restore::RestoreRequest,
) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let summary = cdp_archiver::restore::restore(kafka, archive, req, |p| {
        if tty {
            let width = 30usize;
            let done = (p.files_done * width)
                .checked_div(p.files_total)
                .unwrap_or(width);
            eprint!(
                "\r[{}{}] {}/{} files, {} records, {:.1} MB, {:.0?}   ",
                "#".repeat(done),
                " ".repeat(width - done),
                p.files_done,
                p.files_total,
                p.records,
                p.bytes as f64 / 1e6,
                started.elapsed()
            );
            let _ = std::io::stderr().flush();
        }
    })
    .await
    .with_context(|| format!("restoring {} from {archive} into {}", req.topic, req.into))?;
    if tty {
        eprintln!();
    }
    let secs = summary.elapsed.as_secs_f64().max(1e-9);
    println!(
        "restored {} records from {} files ({:.1} MB) of {} partition(s) into {} in {:.1} s ({:.0} records/s)",
        summary.records,
        summary.files,
        summary.bytes as f64 / 1e6,
        summary.partitions,
        req.into,
        secs,
        summary.records as f64 / secs
    );
    Ok(())
}

/// `cdp dlq ...`.
async fn dlq(command: DlqCommand) -> anyhow::Result<()> {
    let filter = match &command {
        DlqCommand::List { filter } | DlqCommand::Summary { filter } => filter,
        DlqCommand::Replay { filter, .. } => filter,
    };
    let topic = Topics::new(&filter.kafka.topic_prefix).name(Topic::DeadLetter);
    let wanted = cdp_runtime::dlq::Filter {
        group: filter.group.clone(),
        kind: filter.kind.clone(),
        topic: filter.topic.clone(),
        since_ms: filter.since.map(|t| t.timestamp_millis()),
    };
    let letters = {
        let (kafka, topic, wanted) = (filter.kafka.clone(), topic.clone(), wanted.clone());
        tokio::task::spawn_blocking(move || cdp_runtime::dlq::read(&kafka, &topic, &wanted))
            .await??
    };
    let when = |ms: Option<i64>| {
        ms.and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis)
            .map_or_else(
                || "-".to_owned(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            )
    };
    match command {
        DlqCommand::List { .. } => {
            println!(
                "{:<20}  {:<28} {:<40} {:<20} reason",
                "dead-lettered", "group", "record", "kind"
            );
            for l in &letters {
                println!(
                    "{:<20}  {:<28} {:<40} {:<20} {}",
                    when(l.dead_lettered_ms),
                    l.group,
                    format!("{}:{}:{}", l.topic, l.partition, l.offset),
                    l.kind,
                    l.reason
                );
            }
            println!("{} dead letters in {topic}", letters.len());
        }
        DlqCommand::Summary { .. } => {
            let mut counts: std::collections::BTreeMap<(&str, &str, &str), u64> =
                Default::default();
            for l in &letters {
                *counts.entry((&l.group, &l.topic, &l.kind)).or_default() += 1;
            }
            println!("{:>8}  {:<28} {:<32} kind", "letters", "group", "topic");
            for ((group, t, kind), n) in counts {
                println!("{n:>8}  {group:<28} {t:<32} {kind}");
            }
        }
        DlqCommand::Replay { filter, dry_run } => {
            if dry_run {
                for l in &letters {
                    println!(
                        "would re-drive {}:{}:{} ({})",
                        l.topic, l.partition, l.offset, l.kind
                    );
                }
                println!("{} records would be re-driven (dry run)", letters.len());
            } else {
                let producer = cdp_runtime::kafka::producer::Producer::new(&filter.kafka)?;
                let n = cdp_runtime::dlq::redrive(&producer, &topic, &letters).await?;
                println!("{n} records re-driven onto their topics");
            }
        }
    }
    Ok(())
}
