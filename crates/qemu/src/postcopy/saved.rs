//! Parsing a saved device state (a QEMU stream written with
//! `x-ignore-shared`) into the parts a postcopy source sends.

use cloudlet_qemu_format::ram_flag as flag;
use cloudlet_qemu_format::{
    section, write_ram_header, QEMU_VM_FILE_MAGIC as MAGIC, QEMU_VM_FILE_VERSION as VERSION,
};

use super::{ParseSavedStateError, RamBlock, PAGE};

/// A saved device state (QEMU stream written with `x-ignore-shared`), cut
/// into the parts a postcopy source sends.
#[derive(Debug, Clone)]
pub struct SavedState {
    pub(super) machine: Vec<u8>,
    pub(super) ram_section: u32,
    pub(super) ram_instance: u32,
    pub(super) ram_version: u32,
    pub(super) footers: bool,
    pub(super) blocks: Vec<RamBlock>,
    pub(super) main: usize,
    /// Page records of the other blocks (each with its block id).
    pub(super) other_pages: Vec<u8>,
    /// Device sections (FULL ...), without the final EOF.
    pub(super) devices: Vec<u8>,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ParseSavedStateError> {
        if self.b.len() - self.at < n {
            return Err(ParseSavedStateError::Truncated(self.at));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, ParseSavedStateError> {
        Ok(self.take(1)?[0])
    }
    fn be32(&mut self) -> Result<u32, ParseSavedStateError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }
    fn be64(&mut self) -> Result<u64, ParseSavedStateError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
    fn counted(&mut self) -> Result<String, ParseSavedStateError> {
        let n = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    fn peek(&self) -> Option<u8> {
        self.b.get(self.at).copied()
    }
    fn unsupported(&self, what: impl Into<String>) -> ParseSavedStateError {
        ParseSavedStateError::Unsupported {
            at: self.at,
            what: what.into(),
        }
    }
}

impl SavedState {
    /// Parse a device state saved with `x-ignore-shared`, whose guest RAM
    /// lives in block `main` (our VMs: `mem`).
    pub fn parse(bytes: &[u8], main: &str) -> Result<SavedState, ParseSavedStateError> {
        let mut r = Reader { b: bytes, at: 0 };
        if r.be32()? != MAGIC || r.be32()? != VERSION {
            return Err(ParseSavedStateError::Header);
        }
        if r.u8()? != section::CONFIGURATION {
            return Err(r.unsupported("no configuration section"));
        }
        let n = r.be32()? as usize;
        let machine = r.take(n)?.to_vec();
        while r.peek() == Some(section::SUBSECTION) {
            r.u8()?;
            let name = r.counted()?;
            let _version = r.be32()?;
            match name.as_str() {
                "configuration/capabilities" => {
                    for _ in 0..r.be32()? {
                        r.counted()?;
                    }
                }
                "configuration/uuid" => {
                    r.take(16)?;
                }
                other => return Err(r.unsupported(format!("configuration subsection {other}"))),
            }
        }
        let mut st = SavedState {
            machine,
            ram_section: 0,
            ram_instance: 0,
            ram_version: 0,
            footers: false,
            blocks: Vec::new(),
            main: usize::MAX,
            other_pages: Vec::new(),
            devices: Vec::new(),
        };
        let mut seen_ram = false;
        loop {
            let at = r.at;
            match r.u8()? {
                section::START => {
                    let id = r.be32()?;
                    let name = r.counted()?;
                    if name != "ram" || seen_ram {
                        return Err(r.unsupported(format!("iterable section {name}")));
                    }
                    seen_ram = true;
                    st.ram_section = id;
                    st.ram_instance = r.be32()?;
                    st.ram_version = r.be32()?;
                    let total = r.be64()?;
                    if total & flag::MEM_SIZE == 0 {
                        return Err(r.unsupported("RAM setup without MEM_SIZE"));
                    }
                    let total = total & !(PAGE as u64 - 1);
                    let mut sum = 0u64;
                    while sum < total {
                        let id = r.counted()?;
                        let length = r.be64()?;
                        let _addr = r.be64()?; // x-ignore-shared: block address
                        sum = sum
                            .checked_add(length)
                            .ok_or_else(|| r.unsupported("RAM block lengths overflow"))?;
                        st.blocks.push(RamBlock { id, length });
                    }
                    if r.be64()? != flag::EOS {
                        return Err(r.unsupported("RAM setup not ended by EOS"));
                    }
                    st.footers = r.peek() == Some(section::FOOTER);
                    st.footer(&mut r, id)?;
                    st.main = st
                        .blocks
                        .iter()
                        .position(|b| b.id == main)
                        .ok_or_else(|| ParseSavedStateError::NoMainBlock(main.into()))?;
                }
                section::PART | section::END => {
                    let id = r.be32()?;
                    if !seen_ram || id != st.ram_section {
                        return Err(r.unsupported(format!("section {id}")));
                    }
                    st.ram_records(&mut r)?;
                    st.footer(&mut r, id)?;
                }
                section::FULL => {
                    st.devices = devices(bytes, at)?.to_vec();
                    break;
                }
                t => return Err(r.unsupported(format!("section type {t:#x}"))),
            }
        }
        if !seen_ram {
            return Err(ParseSavedStateError::NoMainBlock(main.into()));
        }
        Ok(st)
    }

    fn footer(&self, r: &mut Reader<'_>, id: u32) -> Result<(), ParseSavedStateError> {
        if self.footers && (r.u8()? != section::FOOTER || r.be32()? != id) {
            return Err(r.unsupported("bad section footer"));
        }
        Ok(())
    }

    /// Copy page records of the non-main blocks (re-encoded with explicit
    /// block ids) until EOS.
    fn ram_records(&mut self, r: &mut Reader<'_>) -> Result<(), ParseSavedStateError> {
        let mut block: Option<usize> = None;
        loop {
            let word = r.be64()?;
            let flags = word & (PAGE as u64 - 1);
            let offset = word & !(PAGE as u64 - 1);
            if flags == flag::EOS {
                return Ok(());
            }
            if flags & flag::CONTINUE == 0 {
                let id = r.counted()?;
                block = Some(
                    self.blocks
                        .iter()
                        .position(|b| b.id == id)
                        .ok_or_else(|| r.unsupported(format!("RAM block {id}")))?,
                );
            }
            let b = block.ok_or_else(|| r.unsupported("CONTINUE without a block"))?;
            if b == self.main {
                return Err(r.unsupported("pages of the shared main block"));
            }
            let id = self.blocks[b].id.clone();
            match flags & !flag::CONTINUE {
                flag::ZERO => {
                    let fill = r.u8()?;
                    write_ram_header(&mut self.other_pages, &id, offset, flag::ZERO, false);
                    self.other_pages.push(fill);
                }
                flag::PAGE => {
                    let data = r.take(PAGE)?;
                    write_ram_header(&mut self.other_pages, &id, offset, flag::PAGE, false);
                    self.other_pages.extend_from_slice(data);
                }
                f => return Err(r.unsupported(format!("RAM record flags {f:#x}"))),
            }
        }
    }

    /// The RAM blocks, as the saved VM had them.
    pub fn blocks(&self) -> &[RamBlock] {
        &self.blocks
    }

    /// Size of the main RAM block in bytes.
    pub fn main_len(&self) -> u64 {
        self.blocks[self.main].length
    }
}

/// The device sections: from `start` (the first FULL section) to the EOF
/// marker, which is followed by the JSON VM description (or ends the data).
fn devices(bytes: &[u8], start: usize) -> Result<&[u8], ParseSavedStateError> {
    let n = bytes.len();
    // EOF, 0x06, be32 length, JSON of exactly that length to the end.
    let mut p = n.saturating_sub(6);
    while p > start {
        if bytes[p] == section::EOF && bytes[p + 1] == section::VMDESCRIPTION {
            let len = u32::from_be_bytes([bytes[p + 2], bytes[p + 3], bytes[p + 4], bytes[p + 5]]);
            if p + 6 + len as usize == n {
                return Ok(&bytes[start..p]);
            }
        }
        p -= 1;
    }
    if n > start && bytes[n - 1] == section::EOF {
        return Ok(&bytes[start..n - 1]);
    }
    Err(ParseSavedStateError::Unsupported {
        at: start,
        what: "device state does not end with EOF".into(),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A minimal saved state like QEMU writes with x-ignore-shared.
    pub(in crate::postcopy) fn saved() -> Vec<u8> {
        let mut o = Vec::new();
        o.extend_from_slice(&MAGIC.to_be_bytes());
        o.extend_from_slice(&VERSION.to_be_bytes());
        o.push(section::CONFIGURATION);
        o.extend_from_slice(&13u32.to_be_bytes());
        o.extend_from_slice(b"pc-i440fx-7.2");
        o.push(section::SUBSECTION);
        let name = b"configuration/capabilities";
        o.push(name.len() as u8);
        o.extend_from_slice(name);
        o.extend_from_slice(&1u32.to_be_bytes());
        o.extend_from_slice(&1u32.to_be_bytes());
        o.push(15);
        o.extend_from_slice(b"x-ignore-shared");
        // START ram
        o.push(section::START);
        o.extend_from_slice(&2u32.to_be_bytes());
        o.push(3);
        o.extend_from_slice(b"ram");
        o.extend_from_slice(&0u32.to_be_bytes());
        o.extend_from_slice(&4u32.to_be_bytes());
        o.extend_from_slice(&(((1u64 << 20) + 8192) | flag::MEM_SIZE).to_be_bytes());
        for (id, len) in [("mem", 1u64 << 20), ("pc.rom", 8192)] {
            o.push(id.len() as u8);
            o.extend_from_slice(id.as_bytes());
            o.extend_from_slice(&len.to_be_bytes());
            o.extend_from_slice(&0u64.to_be_bytes());
        }
        o.extend_from_slice(&flag::EOS.to_be_bytes());
        o.push(section::FOOTER);
        o.extend_from_slice(&2u32.to_be_bytes());
        // END ram with one rom page and one zero page
        o.push(section::END);
        o.extend_from_slice(&2u32.to_be_bytes());
        write_ram_header(&mut o, "pc.rom", 0, flag::PAGE, false);
        o.extend_from_slice(&[7u8; PAGE]);
        write_ram_header(&mut o, "pc.rom", 4096, flag::ZERO, true);
        o.push(0);
        o.extend_from_slice(&flag::EOS.to_be_bytes());
        o.push(section::FOOTER);
        o.extend_from_slice(&2u32.to_be_bytes());
        // devices
        o.push(section::FULL);
        o.extend_from_slice(b"device-bytes");
        o.push(section::EOF);
        let desc = b"{\"page_size\":4096}";
        o.push(section::VMDESCRIPTION);
        o.extend_from_slice(&(desc.len() as u32).to_be_bytes());
        o.extend_from_slice(desc);
        o
    }

    #[test]
    fn parses_a_saved_state_into_its_parts() {
        let st = SavedState::parse(&saved(), "mem").unwrap();
        assert_eq!(st.machine, b"pc-i440fx-7.2");
        assert_eq!(st.blocks.len(), 2);
        assert_eq!(st.main_len(), 1 << 20);
        assert!(st.footers);
        assert_eq!(st.devices, b"\x04device-bytes");
        // The ROM page and the zero page, re-encoded with explicit block ids.
        assert_eq!(st.other_pages.len(), 8 + 7 + PAGE + 8 + 7 + 1);
    }

    #[test]
    fn refuses_what_it_does_not_understand() {
        let mut b = saved();
        b[0] = b'X';
        assert!(matches!(
            SavedState::parse(&b, "mem"),
            Err(ParseSavedStateError::Header)
        ));
        assert!(matches!(
            SavedState::parse(&saved(), "ram0"),
            Err(ParseSavedStateError::NoMainBlock(_))
        ));
        let b = saved();
        assert!(SavedState::parse(&b[..b.len() - 30], "mem").is_err());
    }

    #[test]
    fn a_truncated_or_corrupted_state_never_panics() {
        let b = saved();
        // Every prefix but the whole: an error, or (cut inside the JSON VM
        // description, which is not read) a parse; never a panic.
        for n in 0..b.len() {
            let _ = SavedState::parse(&b[..n], "mem");
        }
        for n in 0..b.len() - 40 {
            assert!(SavedState::parse(&b[..n], "mem").is_err(), "prefix {n}");
        }
        // Every byte flipped, a few ways.
        for i in 0..b.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut c = b.clone();
                c[i] ^= x;
                let _ = SavedState::parse(&c, "mem");
            }
        }
    }
}
