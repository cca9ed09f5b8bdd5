//! The steering program, instruction by instruction (`docs/kernel-dispatch.md`
//! walks through it). It runs in the kernel for each new connection to lb's
//! port (and for each queued connection of a listener that closes), and
//! picks the worker's listener:
//!
//! ```text
//! n     = fetch_add(counter[0], 1)          every pick, the next turn
//! len   = schedule[0]                       the master's schedule: its length,
//! slot  = schedule[1 + n % len]             then the slots in the policy's order
//! select(sockets[slot])                     that slot's listener takes it
//! ```
//!
//! With no schedule (no worker ready) or no socket in the slot, the SYN is
//! dropped: the client retries it (after 1 s, then 3 s …), and nothing
//! waits in a queue nobody accepts from.

use std::os::fd::RawFd;

use crate::sys::bpf::Insn;

/// `r0`…`r10` (`r10` is the read-only frame pointer).
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const FP: u8 = 10;

/// `bpf_map_lookup_elem`, `bpf_sk_select_reuseport`.
const LOOKUP: i32 = 1;
const SELECT_REUSEPORT: i32 = 82;
/// What the program returns: `SK_DROP`, `SK_PASS`.
const DROP: i32 = 0;
const PASS: i32 = 1;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

/// `dst = src` (64-bit).
fn mov(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}

/// `dst = imm`.
fn mov_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}

/// `dst += imm`.
fn add_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}

/// `*(u32 *)(FP + off) = imm`.
fn store_imm(off: i16, imm: i32) -> Insn {
    insn(0x62, FP, 0, off, imm)
}

/// `*(u32 *)(FP + off) = src`.
fn store(off: i16, src: u8) -> Insn {
    insn(0x63, FP, src, off, 0)
}

/// `dst = *(u32 *)(src + 0)`.
fn load(dst: u8, src: u8) -> Insn {
    insn(0x61, dst, src, 0, 0)
}

/// `dst = the map whose fd is `fd`` (a two-instruction load the kernel
/// rewrites to the map's address).
fn load_map(dst: u8, fd: RawFd) -> [Insn; 2] {
    [insn(0x18, dst, 1, 0, fd), insn(0, 0, 0, 0, 0)]
}

fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper)
}

/// `if reg == 0 goto +off` (the offset is filled in once the target is known).
fn if_zero(reg: u8) -> Insn {
    insn(0x15, reg, 0, 0, 0)
}

fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}

/// Instructions in the program (`docs/kernel-dispatch.md` counts them).
pub const LEN: usize = 42;

/// The three maps the program reads, by fd.
#[derive(Debug, Clone, Copy)]
pub struct Maps {
    /// `ARRAY[1]` of `u64`: the pick counter.
    pub counter: RawFd,
    /// `ARRAY[1 + SCHEDULE_MAX]` of `u32`: `[0]` the length, then slots.
    pub schedule: RawFd,
    /// `REUSEPORT_SOCKARRAY[slots]`: each slot's listener.
    pub sockets: RawFd,
}

/// The program over `maps`.
pub fn build(maps: Maps) -> Vec<Insn> {
    let mut p = Vec::with_capacity(48);
    let mut to_drop = Vec::new();
    // Keep the context: the select helper needs it, and calls clobber r1-r5.
    p.push(mov(R6, R1));
    // key 0 at FP-4: counter[0], schedule[0].
    p.push(store_imm(-4, 0));

    // n = fetch_add(counter[0], 1), into r7.
    p.extend(load_map(R1, maps.counter));
    p.push(mov(R2, FP));
    p.push(add_imm(R2, -4));
    p.push(call(LOOKUP));
    to_drop.push(p.len());
    p.push(if_zero(R0));
    p.push(mov_imm(R1, 1));
    // lock *(u64 *)(r0 + 0) += r1, r1 = the old value (BPF_ADD | BPF_FETCH).
    p.push(insn(0xdb, R0, R1, 0, 0x01));
    p.push(mov(R7, R1));

    // len = schedule[0], into r8; none: drop.
    p.extend(load_map(R1, maps.schedule));
    p.push(mov(R2, FP));
    p.push(add_imm(R2, -4));
    p.push(call(LOOKUP));
    to_drop.push(p.len());
    p.push(if_zero(R0));
    p.push(load(R8, R0));
    to_drop.push(p.len());
    p.push(if_zero(R8));

    // key 1 + n % len at FP-8; slot = schedule[key], stored at FP-12.
    p.push(insn(0x9f, R7, R8, 0, 0)); // r7 %= r8 (64-bit)
    p.push(add_imm(R7, 1));
    p.push(store(-8, R7));
    p.extend(load_map(R1, maps.schedule));
    p.push(mov(R2, FP));
    p.push(add_imm(R2, -8));
    p.push(call(LOOKUP));
    to_drop.push(p.len());
    p.push(if_zero(R0));
    p.push(load(R1, R0));
    p.push(store(-12, R1));

    // select(ctx, sockets, &slot, 0); failed (no socket there): drop.
    p.push(mov(R1, R6));
    p.extend(load_map(R2, maps.sockets));
    p.push(mov(R3, FP));
    p.push(add_imm(R3, -12));
    p.push(mov_imm(R4, 0));
    p.push(call(SELECT_REUSEPORT));
    // The helper returns 0 on success: pass; anything else falls to drop.
    p.push(insn(0x55, R0, 0, 2, 0)); // if r0 != 0 goto drop
    p.push(mov_imm(R0, PASS));
    p.push(exit());

    let drop_at = p.len();
    p.push(mov_imm(R0, DROP));
    p.push(exit());
    for at in to_drop {
        p[at].off = (drop_at - at - 1) as i16;
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let p = build(Maps {
            counter: 3,
            schedule: 4,
            sockets: 5,
        });
        assert_eq!(p.last().map(|i| i.code), Some(0x95), "ends in exit");
        // docs/kernel-dispatch.md walks through these.
        assert_eq!(p.len(), LEN);
        for (at, i) in p.iter().enumerate() {
            // Conditional jumps: BPF_JMP class with a condition.
            if i.code & 0x07 == 0x05 && i.code != 0x85 && i.code != 0x95 {
                let target = at as i64 + 1 + i64::from(i.off);
                assert!(
                    (0..p.len() as i64).contains(&target),
                    "jump at {at} to {target}"
                );
                assert_ne!(i.off, 0, "jump at {at} was never resolved");
            }
        }
    }
}
