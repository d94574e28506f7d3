//! A stored result: its [`Record`] (what is known of it besides its bytes) and the byte layout
//! of a table value, `[u32 header length][header JSON][payload]`, so the payload stays raw.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// What is known of a result besides its bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Stable id (`board/pipeline/camera/seq`): the CloudEvent id, the same on every retry,
    /// and unique among the boards that share a feed.
    pub id: String,
    /// The board that made it (empty in results stored before boards had ids).
    #[serde(default)]
    pub board: String,
    pub pipeline: String,
    pub camera: String,
    pub seq: u64,
    /// The sink's resolved destination (e.g. the MQTT topic).
    pub topic: String,
    pub content_type: String,
    pub created_ms: u64,
    /// When it was made on the boot's own clock, which wall-clock jumps do not move: its age.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    /// Why it was dead-lettered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A point on one boot's `CLOCK_BOOTTIME`. Boards without a real-time clock start with a stale
/// wall clock and jump (by months) when NTP syncs; measured by the wall clock, every result
/// made before the jump would look that old and be evicted past `max_age`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Boot {
    pub id: String,
    pub ms: u64,
}

impl Boot {
    pub fn now() -> Option<Boot> {
        static ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let id = ID
            .get_or_init(|| {
                std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok().map(|s| s.trim().to_string())
            })
            .clone()?;
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
        Some(Boot { id, ms: t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000 })
    }
}

impl Record {
    /// How long ago the result was made: on the boot clock when it was made on this boot, else
    /// (a result from before a reboot) by the wall clock, the only clock the two boots share.
    pub fn age_ms(&self, now: &Option<Boot>) -> u64 {
        match (&self.boot, now) {
            (Some(then), Some(now)) if then.id == now.id => now.ms.saturating_sub(then.ms),
            _ => now_ms().saturating_sub(self.created_ms),
        }
    }
}

/// The length of [`encode`]'s value, without building it.
pub fn encoded_len(record: &Record, payload: usize) -> usize {
    4 + serde_json::to_vec(record).map_or(0, |h| h.len()) + payload
}

pub fn encode(record: &Record, payload: &[u8]) -> Vec<u8> {
    let header = serde_json::to_vec(record).expect("record serialises");
    let mut out = Vec::with_capacity(4 + header.len() + payload.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
    out
}

/// What a table value of `len` bytes costs on disk, which is what `max_bytes` counts. redb
/// gives a value larger than a page a run of pages of its own, a power of two from 4 KiB (a
/// 70 KB result takes 128 KiB); smaller ones share leaf pages, which split half full.
pub fn disk_cost(len: usize) -> u64 {
    let len = len as u64 + 64;
    if len < 2048 { 2 * len } else { len.next_power_of_two().max(4096) }
}

/// A table value back into its record and payload; an error for anything malformed.
pub fn decode(bytes: &[u8]) -> anyhow::Result<(Record, Bytes)> {
    let (record, n) = parse_header(bytes)?;
    Ok((record, Bytes::copy_from_slice(&bytes[4 + n..])))
}

/// Only the record of a table value, leaving the payload where it is.
pub fn header(bytes: &[u8]) -> anyhow::Result<Record> {
    Ok(parse_header(bytes)?.0)
}

fn parse_header(bytes: &[u8]) -> anyhow::Result<(Record, usize)> {
    anyhow::ensure!(bytes.len() >= 4, "outbox entry too short");
    let n = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
    anyhow::ensure!(bytes.len() - 4 >= n, "outbox entry truncated");
    Ok((serde_json::from_slice(&bytes[4..4 + n]).context("outbox entry header")?, n))
}
