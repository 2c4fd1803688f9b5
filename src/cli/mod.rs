//! The command line. `anyhow` lives here only; exit codes: 0 ok,
//! 1 runtime failure, 2 bad config or usage.

mod onenet;
mod read;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::gateway::Gateway;
use crate::ops::metrics;
use crate::ops::service::{CheckLog, ServiceManager, Watchdog};

#[derive(Parser, Debug)]
#[command(
    name = "edgebridge",
    version,
    about = "IoT gateway: embedded MQTT broker, device drivers, rules and cloud bridges"
)]
pub struct Cli {
    /// The config file.
    #[arg(long, short, global = true, default_value = "config.yaml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the config, compile the rules, and print every problem
    /// with its place.
    Check,
    /// Print a `broker.users` entry with an argon2 hash of a password read
    /// from the terminal (or from standard input when it is not one).
    Passwd {
        /// The username.
        user: String,
    },
    /// OneNET helpers (`onenet token` prints a device token).
    Onenet {
        #[command(subcommand)]
        command: onenet::OnenetCommand,
    },
    /// Read a Modbus device once and print the values: every point of a
    /// configured device (`--device NAME`), or raw registers from a port
    /// (`--port` or `--tcp`) decoded as every type in every byte order.
    Read(read::ReadArgs),
    /// Config helpers.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Work with the rhai rules.
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Subcommand, Debug)]
pub enum RulesCommand {
    /// Run rule test fixtures (`*.test.yaml`) against the rules, with no
    /// device or broker; prints a diff for each failure and exits 1.
    Test {
        /// Fixture files or folders; default: the `*.test.yaml` files in
        /// the config's `rules.dir` (or ./rules).
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigAction {
    /// Print the shipped config.yaml (the solar-site example).
    Default,
}

/// The config.yaml shipped with edgebridge (`/etc/edgebridge/config.yaml`
/// in the package).
pub const DEFAULT_CONFIG: &str = include_str!("../../config.yaml");

/// The longest time between two health checks (and watchdog pings).
const HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// How often gauges that nobody pushes (broker connections) are sampled.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// Exit status for a config that does not load.
pub const EXIT_CONFIG: u8 = 2;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `rules test` prints a report; rule logs below warnings would bury it.
    let quiet = matches!(cli.command, Some(Command::Rules(_)));
    init_logging(if quiet {
        "warn"
    } else {
        // tokio-modbus logs each byte it skips in a garbled answer; the
        // driver logs the answer itself, with its counters.
        "info,rmqtt=warn,rmqtt_net=warn,rmqtt_retainer=warn,tokio_modbus=off"
    });
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(&cli.config),
        Command::Check => check(&cli.config),
        Command::Passwd { user } => report(passwd(&user)),
        Command::Read(args) => read::main(&cli.config, &args),
        Command::Config {
            action: ConfigAction::Default,
        } => {
            print!("{DEFAULT_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Rules(RulesCommand::Test { files }) => rules_test(&cli.config, files),
        Command::Onenet { command } => report(onenet::run(&cli.config, command)),
    }
}

/// Logs go to stderr. Under systemd (journald sets `JOURNAL_STREAM`) there
/// are no timestamps or colours: the journal adds its own.
fn init_logging(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_env("EDGEBRIDGE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(default));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    // Colours only on a terminal: a log file or pipe gets plain text.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = if journald {
        fmt.without_time().with_ansi(false).boxed()
    } else {
        fmt.with_ansi(tty).boxed()
    };
    // `init` also routes the `log` records of the broker library (rmqtt
    // logs through `log`, not `tracing`) into the same filter and format.
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .init();
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Loads the config, printing every problem; `None` means exit 2.
pub fn load_config(path: &Path) -> Option<Config> {
    match Config::load(path) {
        Ok(c) => Some(c),
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} problem(s) in {}", errors.0.len(), path.display());
            None
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let Some(config) = load_config(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    if !check_rules(&config) {
        return ExitCode::from(EXIT_CONFIG);
    }
    if !check_bridge_files(path, &config) {
        return ExitCode::from(EXIT_CONFIG);
    }
    if !check_access_files(&config) {
        return ExitCode::from(EXIT_CONFIG);
    }
    for w in config.warnings() {
        eprintln!("{w}");
    }
    println!("{}: ok", path.display());
    ExitCode::SUCCESS
}

/// Reads the files the bridges point to (certificates and keys), printing
/// every problem.
fn check_bridge_files(path: &Path, config: &Config) -> bool {
    let problems = crate::bridge::check_files(config);
    for p in &problems {
        eprintln!("{}: {p}", path.display());
    }
    if !problems.is_empty() {
        eprintln!("{} problem(s) in {}", problems.len(), path.display());
    }
    problems.is_empty()
}

/// Reads `broker.password_file` and `broker.acl_file` as the broker will,
/// printing the first problem with its `file:line`.
fn check_access_files(config: &Config) -> bool {
    if !config.broker.enabled {
        return true;
    }
    match crate::access::Snapshot::load(config) {
        Ok(_) => true,
        Err(e) => {
            eprintln!("{e}");
            false
        }
    }
}

/// Compiles the configured rules, printing every error with its place.
fn check_rules(config: &Config) -> bool {
    match crate::gateway::load_rules(config) {
        Ok(None) => true,
        Ok(Some(rules)) => {
            let dir = rules
                .dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            println!("{dir}: {} rule file(s) ok", rules.files().len());
            true
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("{} problem(s) in the rules", errors.0.len());
            false
        }
    }
}

/// `edgebridge rules test`: 0 when every fixture passes, 1 otherwise.
fn rules_test(config_path: &Path, files: Vec<PathBuf>) -> ExitCode {
    use crate::pipeline::rules::fixtures;
    // The config is only consulted for the default folder; a missing
    // config is fine.
    let config = Config::load(config_path).ok();
    let rules = config.as_ref().and_then(|c| c.rules.as_ref());
    let files = if files.is_empty() {
        let dir = match (&config, rules) {
            (Some(c), Some(r)) => c.resolve(&r.dir),
            _ => PathBuf::from("rules"),
        };
        vec![dir]
    } else {
        files
    };
    let report = fixtures::run(&files, fixtures::DEADLINE);
    println!("{report}");
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn run(path: &Path) -> ExitCode {
    let Some(config) = load_config(path) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    if !check_rules(&config) {
        return ExitCode::from(EXIT_CONFIG);
    }
    // Before any thread exists: large buffers (password checks) go back
    // to the system when freed.
    crate::ops::memory::tune_allocator();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgebridge")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async move { report(serve(config, path).await) });
    // Tasks that ignore the shutdown (a connection stuck in a write) must
    // not keep the process alive; bounded.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

async fn serve(config: Config, path: &Path) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let service = ServiceManager::from_env();
    // Before the gateway, so that its start is counted too.
    let endpoint = match &config.metrics {
        Some(m) => Some(metrics::install(m).context("starting the metrics endpoint")?),
        None => None,
    };
    let mut gateway = Gateway::start(config)
        .await
        .context("starting the gateway")?;
    service.ready(&serving(&gateway));
    // Health checks publish `edgebridge/<id>/health` and, only while the
    // gateway is healthy, ping the systemd watchdog from this loop.
    let every = service.check_interval(HEALTH_INTERVAL);
    let mut health = tokio::time::interval(every);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = Watchdog::default();
    let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
    loop {
        tokio::select! {
            _ = gauges.tick(), if endpoint.is_some() => {
                if let Some(n) = gateway.broker_connections() {
                    metrics::broker_connections(n);
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break }
            _ = hup.recv() => {
                service.reloading();
                reload(&mut gateway, path).await;
                service.ready(&serving(&gateway));
            }
            _ = health.tick() => {
                let summary = gateway.health((every / 2).min(Duration::from_secs(5))).await;
                let verdict = watchdog.observe(summary.healthy);
                if verdict.ping {
                    service.watchdog_ping();
                }
                match verdict.log {
                    Some(CheckLog::Recovered) => tracing::info!("healthy again"),
                    Some(CheckLog::Failed) => tracing::warn!(problems = ?summary.problems, "health check failed"),
                    Some(CheckLog::Unhealthy) => tracing::error!(problems = ?summary.problems, "unhealthy: the watchdog is no longer pinged"),
                    None => {}
                }
            }
        }
    }
    service.stopping();
    gateway.shutdown().await;
    if let Some(e) = endpoint {
        e.stop();
    }
    Ok(())
}

/// The status line systemd shows.
fn serving(gateway: &Gateway) -> String {
    format!(
        "serving: {} device(s), {} listener(s)",
        gateway.config().devices.len(),
        gateway.listeners().len()
    )
}

/// SIGHUP: reads the config file again and applies it, then recompiles the
/// rules. A config that does not load is rejected with every problem
/// logged, and the running config and rules stay.
async fn reload(gateway: &mut Gateway, path: &Path) {
    if reload_config(gateway, path).await {
        // The rules thread logs the outcome: the kept and restarted files,
        // or each compile error with file:line:col.
        if gateway.reload_rules().await.is_none() {
            tracing::debug!("no rules configured, no rules to reload");
        }
    }
}

/// `false` when the config was rejected.
async fn reload_config(gateway: &mut Gateway, path: &Path) -> bool {
    tracing::info!(config = %path.display(), "SIGHUP: reloading the config");
    let new = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            tracing::error!(
                problems = errors.0.len(),
                "config rejected; the running config stays"
            );
            metrics::reload(false);
            return false;
        }
    };
    match gateway.reload(new).await {
        Ok(r) => {
            metrics::reload(true);
            if !r.needs_restart.is_empty() {
                tracing::warn!(
                    keys = ?r.needs_restart,
                    "these settings changed but apply only after a restart (systemctl restart edgebridge)"
                );
            }
            if r.is_noop() {
                tracing::info!("config reloaded: nothing changed");
            } else {
                let (d, b) = (&r.devices, &r.bridges);
                tracing::info!(
                    restarted = ?d.restarted,
                    started = ?d.started,
                    stopped = ?d.stopped,
                    unchanged = d.unchanged.len(),
                    bridges_restarted = ?b.restarted,
                    bridges_started = ?b.started,
                    bridges_stopped = ?b.stopped,
                    bridges_failed = ?b.failed,
                    bridges_unchanged = b.unchanged.len(),
                    mappings_changed = r.mappings_changed,
                    commands_changed = r.commands_changed,
                    "config reloaded"
                );
            }
        }
        Err(e) => {
            metrics::reload(false);
            tracing::error!(error = %e, "config rejected; the running config stays");
            return false;
        }
    }
    true
}

fn passwd(user: &str) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let password = if std::io::stdin().is_terminal() {
        let p1 = rpassword::prompt_password(format!("Password for {user}: "))?;
        let p2 = rpassword::prompt_password("Again: ")?;
        anyhow::ensure!(p1 == p2, "the passwords differ");
        p1
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    anyhow::ensure!(!password.is_empty(), "empty password");
    let hash = crate::broker::hash_password(&password)
        .map_err(|e| anyhow::anyhow!("hashing failed: {e}"))?;
    println!("- {{ username: {user}, password_hash: \"{hash}\" }}");
    Ok(())
}
