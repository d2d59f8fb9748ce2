//! `cdp`: every service of the platform and the operator commands, in one binary.

mod cli;

use anyhow::Context;
use clap::Parser;

use cdp_runtime::admin::{self, Readiness};
use cdp_runtime::metrics::Metrics;
use cdp_runtime::topics::{self, Ensured, Topics};
use cdp_runtime::{pg, telemetry, Shutdown};
use cli::{Cli, Command, SchemasCommand, TopicsCommand};

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
    Ok(())
}

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

    fn handles(&self) -> (Metrics, Readiness, Shutdown) {
        (
            self.metrics.clone(),
            self.readiness.clone(),
            self.shutdown.clone(),
        )
    }

    /// Runs the services until shutdown; the first to fail stops the others.
    async fn run(
        self,
        services: impl std::future::Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let result = services.await;
        self.shutdown.trigger();
        match self.admin.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "admin server"),
            Err(e) => tracing::warn!(error = %e, "admin server task"),
        }
        result
    }
}

async fn run_ingest(platform: Platform, args: cli::IngestCommand) -> anyhow::Result<()> {
    let config = cdp_ingest::IngestConfig {
        kafka: args.kafka,
        pg: args.pg,
        keys: args.keys,
        ingest: args.ingest,
    };
    let (metrics, readiness, shutdown) = platform.handles();
    platform
        .run(async move {
            cdp_ingest::run(config, &metrics, &readiness, shutdown)
                .await
                .context("ingest")
        })
        .await
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
            run_ingest(platform, args).await
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
                        "{:<18} v{} {:016x}{current}",
                        set.name, v.version, v.fingerprint
                    );
                }
            }
            Ok(())
        }
        Command::All { args } => {
            let topics = Topics::new(&args.kafka.topic_prefix);
            topics::ensure(&args.kafka, &topics::catalogue(&topics))
                .await
                .context("creating topics")?;
            migrate(&connect(&args.pg).await?).await?;
            let platform = Platform::start(&args.admin).await?;
            tracing::info!(services = ?cli::SERVICES, "cdp all running; Ctrl-C to stop");
            run_ingest(platform, args).await
        }
    }
}
