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
            let pool = pg::connect(&pg_args).await.with_context(|| {
                format!(
                    "connecting to {}",
                    cdp_runtime::config::redact_url(&pg_args.database_url)
                )
            })?;
            pg::migrator()
                .run(&pool)
                .await
                .context("runtime migrations")?;
            println!("migrations applied");
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
                        "{:<18} v{} {:016x}{current}",
                        set.name, v.version, v.fingerprint
                    );
                }
            }
            Ok(())
        }
        Command::All {
            kafka,
            pg: pg_args,
            admin: admin_args,
        } => {
            let shutdown = Shutdown::new();
            shutdown
                .listen_for_signals()
                .context("installing signal handlers")?;
            let metrics = Metrics::new();
            let readiness = Readiness::default();
            let topics = Topics::new(&kafka.topic_prefix);
            topics::ensure(&kafka, &topics::catalogue(&topics))
                .await
                .context("creating topics")?;
            let pool = pg::connect(&pg_args).await.with_context(|| {
                format!(
                    "connecting to {}",
                    cdp_runtime::config::redact_url(&pg_args.database_url)
                )
            })?;
            pg::migrator()
                .run(&pool)
                .await
                .context("runtime migrations")?;
            let (addr, serve) = admin::bind(
                admin_args.admin_addr,
                metrics,
                readiness.clone(),
                shutdown.clone(),
            )
            .await
            .with_context(|| format!("binding the admin server on {}", admin_args.admin_addr))?;
            readiness.component("platform").set(true);
            tracing::info!(admin = %addr, services = ?cli::SERVICES, "cdp all running; Ctrl-C to stop");
            serve.await.context("admin server")?;
            Ok(())
        }
    }
}
