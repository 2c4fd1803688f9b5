//! A device with no hardware: each point follows a wave, so a fresh
//! install shows realistic data at once. Writable points take commands;
//! a written value overrides the wave until the next write.

pub mod check;

use std::collections::HashMap;
use std::f64::consts::PI;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

use super::{reply, DriverContext};
use crate::config::{DataType, DeviceConfig, PointConfig, Wave};
use crate::model::{now_ms, Command, CommandResult, Quality, Reading, Value, WriteError};
use crate::ops::metrics::{self, PollOutcome};

/// The value of a wave at `t` seconds into the run.
pub fn wave_value(p: &PointConfig, t: f64, rng: &mut impl Rng) -> Value {
    let wave = p.wave.unwrap_or(Wave::Constant);
    let min = p.min.unwrap_or(0.0);
    let max = p
        .max
        .unwrap_or(if wave == Wave::Square { 1.0 } else { 100.0 });
    let period = p.period.unwrap_or(Duration::from_secs(60)).as_secs_f64();
    let phase = (t / period).fract();
    let span = max - min;
    let v = match wave {
        Wave::Sine => min + span * (0.5 - 0.5 * (2.0 * PI * phase).cos()),
        Wave::Square => {
            // A square wave is naturally on/off: bool unless min/max say otherwise.
            if p.min.is_none() && p.max.is_none() {
                return Value::Bool(phase < 0.5);
            }
            if phase < 0.5 {
                max
            } else {
                min
            }
        }
        Wave::Ramp => min + span * phase,
        Wave::Random => min + span * rng.gen::<f64>(),
        Wave::Constant => p.value.unwrap_or(min),
    };
    match p.data_type {
        Some(DataType::Bool) => Value::Bool(v != 0.0),
        Some(DataType::F32 | DataType::F64) | None => Value::Float(v),
        Some(_) => Value::Int(v.round() as i64),
    }
}

pub fn spawn(dev: DeviceConfig, ctx: DriverContext, mut commands: mpsc::Receiver<Command>) {
    let tracker = ctx.tasks.clone();
    tracker.spawn(async move {
        let name: Arc<str> = Arc::from(dev.name.as_str());
        let points: Vec<(Arc<str>, Option<Arc<str>>)> = dev
            .points
            .iter()
            .map(|p| (Arc::from(p.name.as_str()), p.unit.as_deref().map(Arc::from)))
            .collect();
        let mut overrides: HashMap<String, Value> = HashMap::new();
        let mut rng = rand::rngs::StdRng::from_entropy();
        let start = Instant::now();
        let mut tick = tokio::time::interval(dev.poll_interval());
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ctx.events.online(&dev.name).await;
        tracing::info!(device = %dev.name, points = dev.points.len(), "simulator started");
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                Some(cmd) = commands.recv() => {
                    let result = write(&dev, &mut overrides, &cmd);
                    reply(cmd, result);
                }
                _ = tick.tick() => {
                    let polled = Instant::now();
                    let t = start.elapsed().as_secs_f64();
                    let ts = now_ms();
                    let batch = dev.points.iter().zip(&points).map(|(p, (pname, unit))| Reading {
                        device: name.clone(),
                        point: pname.clone(),
                        value: overrides.get(&p.name).cloned().unwrap_or_else(|| wave_value(p, t, &mut rng)),
                        unit: unit.clone(),
                        ts,
                        quality: Quality::Good,
                    }).collect();
                    metrics::device_poll(&dev.name, PollOutcome::Ok, polled.elapsed());
                    // Writes are answered while the pipeline is full.
                    let sent = loop {
                        tokio::select! {
                            slot = ctx.events.reserve() => break slot.map(|s| s.send(batch)),
                            Some(cmd) = commands.recv() => {
                                let result = write(&dev, &mut overrides, &cmd);
                                reply(cmd, result);
                            }
                        }
                    };
                    if sent.is_err() {
                        break;
                    }
                }
            }
        }
        ctx.events.offline(&dev.name, Some("gateway stopped")).await;
    });
}

fn write(
    dev: &DeviceConfig,
    overrides: &mut HashMap<String, Value>,
    cmd: &Command,
) -> CommandResult {
    let Some(p) = dev.point(&cmd.point) else {
        return Err(WriteError::NoSuchPoint {
            device: dev.name.clone(),
            point: cmd.point.clone(),
        });
    };
    if !p.writable {
        return Err(WriteError::ReadOnly {
            device: dev.name.clone(),
            point: p.name.clone(),
        });
    }
    overrides.insert(p.name.clone(), cmd.value.clone());
    tracing::info!(device = %dev.name, point = %p.name, value = %cmd.value, "simulator point written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(wave: Wave, min: Option<f64>, max: Option<f64>) -> PointConfig {
        serde_yaml::from_str::<PointConfig>("name: p")
            .map(|mut p| {
                p.wave = Some(wave);
                p.min = min;
                p.max = max;
                p.period = Some(Duration::from_secs(60));
                p
            })
            .unwrap()
    }

    #[test]
    fn sine_spans_min_to_max() {
        let p = point(Wave::Sine, Some(0.0), Some(5000.0));
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(wave_value(&p, 0.0, &mut rng), Value::Float(0.0));
        assert_eq!(wave_value(&p, 30.0, &mut rng), Value::Float(5000.0));
    }

    #[test]
    fn square_without_bounds_is_bool() {
        let p = point(Wave::Square, None, None);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert_eq!(wave_value(&p, 10.0, &mut rng), Value::Bool(true));
        assert_eq!(wave_value(&p, 40.0, &mut rng), Value::Bool(false));
    }

    #[test]
    fn random_stays_in_bounds() {
        let p = point(Wave::Random, Some(10.0), Some(20.0));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..100 {
            let v = wave_value(&p, i as f64, &mut rng).as_f64().unwrap();
            assert!((10.0..=20.0).contains(&v));
        }
    }
}
