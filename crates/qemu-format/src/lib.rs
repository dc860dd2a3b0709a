//! The wire constants of QEMU's migration stream, in one place.
//!
//! Two crates speak the stream: `cloudlet-handoff` parses and re-encodes
//! what QEMU writes during a live handoff (precopy), and `cloudlet-qemu`
//! writes one itself when it plays the source of a postcopy restore (early
//! start). Both take their numbers from here. This crate has no
//! dependencies and no code beyond a few helpers on the constants.
//!
//! # The stream (all integers big-endian)
//!
//! ```text
//! be32 QEMU_VM_FILE_MAGIC ("QEVM")  be32 QEMU_VM_FILE_VERSION (3)
//! 0x07 CONFIGURATION  be32 len, machine type; subsections (0x05, u8 len
//!                     name, be32 version, body) e.g. capabilities, uuid
//! 0x08 COMMAND        be16 command id, be16 len, data (see `command`)
//! 0x01 START          be32 section id, u8 len idstr, be32 instance,
//!                     be32 version, then the section's setup
//! 0x02 PART           be32 section id, then records (an iterable section,
//!                     for us only "ram": its records end with be64 EOS)
//! 0x03 END            as PART, the section's last data
//! 0x04 FULL           a whole device section (as START's header); its
//!                     length is not on the wire: only its loader knows it
//! 0x7e FOOTER         be32 section id, after each section when the
//!                     machine type sends footers (every QEMU 7.2 machine)
//! 0x00 EOF            then (a file, not a live migration) 0x06
//!                     VMDESCRIPTION, be32 len, JSON of the device state
//! ```
//!
//! The "ram" section's setup (START) is `be64 total | MEM_SIZE`, then per
//! RAM block `u8 len, id, be64 used length` (plus be64 fields that
//! capabilities add, e.g. the block address with `x-ignore-shared`), then
//! `be64 EOS`. A RAM record is `be64 offset | flags` (offsets are page
//! aligned, so the low 12 bits hold [`ram_flag`]s); unless `CONTINUE` is set
//! a length-prefixed block id follows (the loader remembers the last one);
//! then `ZERO` has one fill byte, `PAGE` [`PAGE_SIZE`] bytes.
//!
//! A postcopy destination answers on the same socket (the return path,
//! opened by `OPEN_RETURN_PATH`) with `be16 type, be16 len, data`
//! messages, see [`return_path`].
//!
//! # Compatibility
//!
//! These values are QEMU 7.2's (`migration/migration.h`, `savevm.c`,
//! `ram.c`), the QEMU that cloudlet pins (`cloudlet doctor` checks it).
//! The numbers themselves rarely move, but what a section *contains*
//! depends on the QEMU version, the machine type and the migration
//! capabilities of both sides. Each user of this crate therefore still
//! refuses, or passes through untouched, whatever it does not fully
//! understand, and a QEMU upgrade is a change to check against this list
//! and against both users' tests on real QEMU streams.

/// The target page size of x86 guests: the unit of RAM records.
pub const PAGE_SIZE: usize = 4096;

/// The low bits of a RAM record's be64 that hold its [`ram_flag`]s.
pub const RAM_FLAG_MASK: u64 = PAGE_SIZE as u64 - 1;

/// `QEMU_VM_FILE_MAGIC`: "QEVM".
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;

/// `QEMU_VM_FILE_VERSION`.
pub const QEMU_VM_FILE_VERSION: u32 = 3;

/// Section types (`QEMU_VM_*`), the first byte of every top-level item.
pub mod section {
    pub const EOF: u8 = 0x00;
    pub const START: u8 = 0x01;
    pub const PART: u8 = 0x02;
    pub const END: u8 = 0x03;
    pub const FULL: u8 = 0x04;
    pub const SUBSECTION: u8 = 0x05;
    pub const VMDESCRIPTION: u8 = 0x06;
    pub const CONFIGURATION: u8 = 0x07;
    pub const COMMAND: u8 = 0x08;
    pub const FOOTER: u8 = 0x7e;
}

/// RAM record flags (`RAM_SAVE_FLAG_*`, the low bits of a record's be64).
pub mod ram_flag {
    pub const ZERO: u64 = 0x02;
    pub const MEM_SIZE: u64 = 0x04;
    pub const PAGE: u64 = 0x08;
    pub const EOS: u64 = 0x10;
    pub const CONTINUE: u64 = 0x20;
    pub const XBZRLE: u64 = 0x40;
    pub const HOOK: u64 = 0x80;
    pub const COMPRESS_PAGE: u64 = 0x100;
}

/// Command ids of a `COMMAND` item (`MIG_CMD_*`).
pub mod command {
    /// The destination opens its return path (no data).
    pub const OPEN_RETURN_PATH: u16 = 1;
    /// be32 value; the destination answers PONG on the return path.
    pub const PING: u16 = 2;
    /// be64 page-size summary, be64 target page size.
    pub const POSTCOPY_ADVISE: u16 = 3;
    /// The destination registers its RAM for page faults (no data).
    pub const POSTCOPY_LISTEN: u16 = 4;
    /// The guest starts on the destination (no data).
    pub const POSTCOPY_RUN: u16 = 5;
    /// u8 version 0, u8 len, block id, then (be64 start, be64 length)s.
    pub const POSTCOPY_RAM_DISCARD: u16 = 6;
    /// be32 length, then a nested stream of that length.
    pub const PACKAGED: u16 = 7;
}

/// Return path message types (`MIG_RP_MSG_*`), destination to source.
pub mod return_path {
    /// be32 status; the destination sends nothing more.
    pub const SHUT: u16 = 1;
    /// be32, the value of a PING.
    pub const PONG: u16 = 2;
    /// be64 offset, be32 length, u8 len, block id.
    pub const REQ_PAGES_ID: u16 = 3;
    /// be64 offset, be32 length, in the block of the last REQ_PAGES_ID.
    pub const REQ_PAGES: u16 = 4;
}

/// The first 8 bytes of every stream.
pub fn stream_header() -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&QEMU_VM_FILE_MAGIC.to_be_bytes());
    h[4..].copy_from_slice(&QEMU_VM_FILE_VERSION.to_be_bytes());
    h
}

/// Appends the header of a RAM record as QEMU writes it: `be64 offset |
/// flag (| CONTINUE)`, then, unless `continued` (same block as the record
/// before, in the same section), the length-prefixed block id. `flag` is
/// one of [`ram_flag`]; the record's body (fill byte, page) follows.
pub fn write_ram_header(out: &mut Vec<u8>, block: &str, offset: u64, flag: u64, continued: bool) {
    let cont = if continued { ram_flag::CONTINUE } else { 0 };
    out.extend_from_slice(&(offset | flag | cont).to_be_bytes());
    if !continued {
        out.push(block.len() as u8);
        out.extend_from_slice(block.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_reads_qevm_3() {
        assert_eq!(&stream_header(), b"QEVM\0\0\0\x03");
    }

    #[test]
    fn a_ram_header_names_its_block_unless_continued() {
        let mut out = Vec::new();
        write_ram_header(&mut out, "pc.ram", 0x2000, ram_flag::PAGE, false);
        assert_eq!(&out[..8], &(0x2000 | ram_flag::PAGE).to_be_bytes());
        assert_eq!(&out[8..], b"\x06pc.ram");
        out.clear();
        write_ram_header(&mut out, "pc.ram", 0x3000, ram_flag::ZERO, true);
        assert_eq!(
            out,
            (0x3000 | ram_flag::ZERO | ram_flag::CONTINUE).to_be_bytes()
        );
    }

    #[test]
    fn ram_flags_fit_below_the_page_offset() {
        for f in [
            ram_flag::ZERO,
            ram_flag::MEM_SIZE,
            ram_flag::PAGE,
            ram_flag::EOS,
            ram_flag::CONTINUE,
            ram_flag::XBZRLE,
            ram_flag::HOOK,
            ram_flag::COMPRESS_PAGE,
        ] {
            assert_eq!(f & RAM_FLAG_MASK, f);
            assert_eq!(f.count_ones(), 1);
        }
    }
}
