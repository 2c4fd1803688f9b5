//! `edgebridge read`: one Modbus read from the command line, for
//! commissioning. Uses the same session, plan and decoding as the
//! gateway, so what it prints is what the gateway will publish.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, ValueEnum};

use crate::config::{LineSettings, Parity, Table};
use crate::drivers::modbus::device::Device;
use crate::drivers::modbus::inspect;
use crate::drivers::modbus::plan::{Block, Merge};
use crate::drivers::modbus::session::{BlockData, Endpoint, Session};
use crate::drivers::modbus::{endpoint_of, plan};

#[derive(Args, Debug)]
pub struct ReadArgs {
    /// A Modbus device of the config: read all its points once.
    #[arg(long, conflicts_with_all = ["port", "tcp"])]
    pub device: Option<String>,
    /// Serial port of a one-off RTU read, e.g. /dev/ttyUSB0.
    #[arg(long, conflicts_with = "tcp")]
    pub port: Option<String>,
    /// host:port of a one-off Modbus TCP read.
    #[arg(long)]
    pub tcp: Option<String>,
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    #[arg(long, value_enum, default_value = "none")]
    pub parity: ParityArg,
    #[arg(long, default_value_t = 8)]
    pub data_bits: u8,
    #[arg(long, default_value_t = 1)]
    pub stop_bits: u8,
    /// Slave (unit) id.
    #[arg(long, default_value_t = 1)]
    pub slave: u8,
    #[arg(long, value_enum, default_value = "holding")]
    pub table: TableArg,
    /// First register or coil, 0-based.
    #[arg(long, default_value_t = 0)]
    pub address: u16,
    /// Registers or coils to read.
    #[arg(long, default_value_t = 2)]
    pub count: u16,
    /// How long to wait for the answer.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ParityArg {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TableArg {
    Coil,
    Discrete,
    Input,
    Holding,
}

pub fn main(config: &Path, args: &ReadArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    if let Some(name) = &args.device {
        let Some(cfg) = super::load_config(config) else {
            return ExitCode::from(super::EXIT_CONFIG);
        };
        let Some(dev) = cfg.devices.iter().find(|d| d.name == *name) else {
            eprintln!("error: {} has no device named `{name}`", config.display());
            return ExitCode::from(super::EXIT_CONFIG);
        };
        let Some(endpoint) = endpoint_of(dev) else {
            eprintln!(
                "error: device `{name}` uses driver `{}`; `read` works with Modbus devices",
                dev.driver.name()
            );
            return ExitCode::from(super::EXIT_CONFIG);
        };
        let device = Device::from_config(dev);
        return super::report(runtime.block_on(read_device(endpoint, device)));
    }
    if args.port.is_none() && args.tcp.is_none() {
        eprintln!("error: say what to read: --device NAME, or --port PATH / --tcp HOST:PORT");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    super::report(runtime.block_on(read_once(args)))
}

async fn open(endpoint: Endpoint, timeout: Duration) -> anyhow::Result<Session> {
    let mut session = Session::new(endpoint);
    session.open(timeout).await.with_context(|| {
        let hint = match session.endpoint() {
            Endpoint::Serial { .. } => {
                " (the gateway holds its ports exclusively: stop it first, e.g. \
                 `systemctl stop edgebridge`)"
            }
            Endpoint::Tcp { .. } => "",
        };
        format!("cannot open {}{hint}", session.endpoint())
    })?;
    Ok(session)
}

async fn read_device(endpoint: Endpoint, device: Device) -> anyhow::Result<()> {
    let mut session = open(endpoint, device.timeout.max(Duration::from_secs(1))).await?;
    println!(
        "{}: slave {} via {}, {} points in {} requests",
        device.name,
        device.slave,
        session.endpoint(),
        device.points.len(),
        device.plan().blocks().len()
    );
    let reads = inspect::read_device(&device, &mut session).await;
    print!("{}", inspect::describe_points(&reads));
    if reads.iter().all(|r| r.result.is_err()) {
        bail!("no point could be read");
    }
    Ok(())
}

async fn read_once(args: &ReadArgs) -> anyhow::Result<()> {
    let (table, max) = match args.table {
        TableArg::Coil => (Table::Coil, plan::MAX_BITS),
        TableArg::Discrete => (Table::Discrete, plan::MAX_BITS),
        TableArg::Input => (Table::Input, plan::MAX_REGISTERS),
        TableArg::Holding => (Table::Holding, plan::MAX_REGISTERS),
    };
    if args.count == 0 || args.count > max {
        bail!("--count must be 1 to {max} for this table");
    }
    let endpoint = match (&args.port, &args.tcp) {
        (Some(path), _) => {
            let settings = LineSettings {
                baud: args.baud,
                parity: match args.parity {
                    ParityArg::None => Parity::None,
                    ParityArg::Even => Parity::Even,
                    ParityArg::Odd => Parity::Odd,
                },
                data_bits: args.data_bits,
                stop_bits: args.stop_bits,
            };
            Endpoint::Serial {
                path: path.clone(),
                settings,
                frame_gap: Duration::ZERO,
            }
        }
        (None, Some(address)) => Endpoint::Tcp {
            address: address.clone(),
        },
        (None, None) => bail!("--port or --tcp is needed"),
    };
    let mut session = open(endpoint, args.timeout).await?;
    let block = Block {
        table,
        start: args.address,
        count: args.count,
        points: Vec::new(),
        merge: Merge::Solo,
    };
    let data = session
        .read(args.slave, &block, args.timeout)
        .await
        .map_err(|e| anyhow!("slave {} via {}: {e}", args.slave, session.endpoint()))?;
    println!(
        "slave {} via {}: {} {}..{}",
        args.slave,
        session.endpoint(),
        crate::drivers::modbus::point::table_name(table),
        args.address,
        u32::from(args.address) + u32::from(args.count) - 1
    );
    match data {
        BlockData::Bits(bits) => print!("{}", inspect::describe_bits(args.address, &bits)),
        BlockData::Words(words) => print!("{}", inspect::describe_registers(args.address, &words)),
    }
    Ok(())
}
