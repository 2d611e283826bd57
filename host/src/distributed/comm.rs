//! The world communicator and what each kind of exchange costs: every
//! collective the run makes goes through [`Comm`], which meters its calls,
//! bytes and seconds by name.

use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;
use serde::Serialize;

/// Collective calls of one kind and what they carried.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Meter {
    /// Calls made.
    pub calls: u64,
    /// Payload bytes this process handed over for the other processes
    /// (for an all-reduce, its whole buffer).
    pub bytes_out: u64,
    /// Payload bytes this process received from the other processes (for
    /// an all-reduce, the whole result).
    pub bytes_in: u64,
    /// Seconds inside the calls, waiting for the slowest process included.
    pub seconds: f64,
}

/// A [`Meter`] divided by the steps it covered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PerStep {
    /// Calls per step.
    pub calls: f64,
    /// Bytes out per step.
    pub bytes_out: f64,
    /// Bytes in per step.
    pub bytes_in: f64,
    /// Seconds per step.
    pub seconds: f64,
}

/// The world communicator, with a [`Meter`] per kind of exchange.
pub struct Comm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    meters: Vec<(&'static str, Meter)>,
}

impl std::fmt::Debug for Comm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Comm").field("rank", &self.rank).field("size", &self.size).finish_non_exhaustive()
    }
}

/// `n` as an MPI count.
pub(super) fn count(n: usize) -> Count {
    Count::try_from(n).expect("an MPI message of more than 2^31 elements")
}

impl Comm {
    /// Wraps a communicator.
    pub fn new(world: SimpleCommunicator) -> Self {
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Self { world, rank, size, meters: Vec::new() }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of processes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The meters, in the order their kinds were first used.
    pub fn meters(&self) -> &[(&'static str, Meter)] {
        &self.meters
    }

    /// Zeroes the meters (after set-up, so that they count steps only).
    pub fn reset_meters(&mut self) {
        self.meters.clear();
    }

    fn record(&mut self, name: &'static str, out: usize, inn: usize, t0: Instant) {
        let i = match self.meters.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                self.meters.push((name, Meter::default()));
                self.meters.len() - 1
            }
        };
        let m = &mut self.meters[i].1;
        m.calls += 1;
        m.bytes_out += out as u64;
        m.bytes_in += inn as u64;
        m.seconds += t0.elapsed().as_secs_f64();
    }

    /// All-gather: `recv` (P times `send`'s length) gets every process's
    /// `send`, in rank order.
    pub fn all_gather(&mut self, name: &'static str, send: &[u32], recv: &mut [u32]) {
        assert_eq!(recv.len(), send.len() * self.size);
        let t0 = Instant::now();
        self.world.all_gather_into(send, recv);
        let others = 4 * send.len() * (self.size - 1);
        self.record(name, others, others, t0);
    }

    /// All-to-all with equal blocks: block `r` of `send` goes to process
    /// `r`, and block `r` of `recv` comes from it.
    pub fn all_to_all(&mut self, name: &'static str, send: &[u32], recv: &mut [u32]) {
        assert_eq!(send.len(), recv.len());
        assert_eq!(send.len() % self.size, 0);
        let t0 = Instant::now();
        self.world.all_to_all_into(send, recv);
        let others = 4 * send.len() / self.size * (self.size - 1);
        self.record(name, others, others, t0);
    }

    /// All-to-all with blocks of any length: `counts[r]` words of `send`
    /// (blocks in rank order) go to process `r`; `recv` is replaced by the
    /// blocks received, in rank order. Two calls: the counts, then the
    /// words.
    pub fn all_to_all_v(&mut self, name: &'static str, send: &[u32], counts: &[Count], recv: &mut Vec<u32>) {
        assert_eq!(counts.len(), self.size);
        let t0 = Instant::now();
        let mut incoming = vec![0 as Count; self.size];
        self.world.all_to_all_into(counts, &mut incoming[..]);
        let displs = offsets(counts);
        let in_displs = offsets(&incoming);
        let total: usize = incoming.iter().map(|&c| c as usize).sum();
        recv.clear();
        recv.resize(total, 0);
        let send_part = Partition::new(send, counts, &displs[..]);
        let mut recv_part = PartitionMut::new(&mut recv[..], &incoming[..], &in_displs[..]);
        self.world.all_to_all_varcount_into(&send_part, &mut recv_part);
        let me = self.rank;
        let out: usize = counts.iter().enumerate().filter(|&(r, _)| r != me).map(|(_, &c)| c as usize).sum();
        let inn = total - incoming[me] as usize;
        let counts_bytes = 4 * (self.size - 1);
        self.record(name, 4 * out + counts_bytes, 4 * inn + counts_bytes, t0);
        // The counts exchange is a call of its own.
        if let Some((_, m)) = self.meters.iter_mut().find(|(n, _)| *n == name) {
            m.calls += 1;
        }
    }

    /// Element-wise sum over processes; every process gets the result.
    pub fn sum_f32(&mut self, name: &'static str, send: &[f32], recv: &mut [f32]) {
        // MPI would read past a shorter buffer rather than complain.
        assert_eq!(send.len(), recv.len());
        let t0 = Instant::now();
        self.world.all_reduce_into(send, recv, SystemOperation::sum());
        self.record(name, 4 * send.len(), 4 * recv.len(), t0);
    }

    /// Element-wise bitwise or over processes.
    pub fn or_u32(&mut self, name: &'static str, send: &[u32], recv: &mut [u32]) {
        // MPI would read past a shorter buffer rather than complain.
        assert_eq!(send.len(), recv.len());
        let t0 = Instant::now();
        self.world.all_reduce_into(send, recv, SystemOperation::bitwise_or());
        self.record(name, 4 * send.len(), 4 * recv.len(), t0);
    }

    /// Gathers every process's `send` (all of equal length) on process 0,
    /// in rank order; `None` elsewhere.
    pub fn gather_to_root(&mut self, name: &'static str, send: &[u32]) -> Option<Vec<u32>> {
        let t0 = Instant::now();
        let root = self.world.process_at_rank(0);
        let got = if self.rank == 0 {
            let mut all = vec![0u32; send.len() * self.size];
            root.gather_into_root(send, &mut all[..]);
            Some(all)
        } else {
            root.gather_into(send);
            None
        };
        let (out, inn) = if self.rank == 0 { (0, 4 * send.len() * (self.size - 1)) } else { (4 * send.len(), 0) };
        self.record(name, out, inn, t0);
        got
    }
}

fn offsets(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0 as Count, |at, &c| {
            let d = *at;
            *at += c;
            Some(d)
        })
        .collect()
}
