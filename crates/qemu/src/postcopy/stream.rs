//! Writing the postcopy stream: the preamble, the packaged device state
//! and RUN, page records in PART sections, the end.

use std::io::{self, Write};

use cloudlet_qemu_format::command as cmd;
use cloudlet_qemu_format::ram_flag as flag;
use cloudlet_qemu_format::{
    section, write_ram_header, QEMU_VM_FILE_MAGIC as MAGIC, QEMU_VM_FILE_VERSION as VERSION,
};

use super::{SavedState, PAGE};

impl SavedState {
    pub(super) fn section_header(&self, out: &mut Vec<u8>, kind: u8) {
        out.push(kind);
        out.extend_from_slice(&self.ram_section.to_be_bytes());
        if kind == section::START {
            out.push(3);
            out.extend_from_slice(b"ram");
            out.extend_from_slice(&self.ram_instance.to_be_bytes());
            out.extend_from_slice(&self.ram_version.to_be_bytes());
        }
    }

    pub(super) fn section_footer(&self, out: &mut Vec<u8>) {
        if self.footers {
            out.push(section::FOOTER);
            out.extend_from_slice(&self.ram_section.to_be_bytes());
        }
    }

    /// Everything before the guest may run: header, configuration, return
    /// path, advise, RAM setup and the small blocks' pages.
    pub(super) fn preamble(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(self.other_pages.len() + 4096);
        o.extend_from_slice(&MAGIC.to_be_bytes());
        o.extend_from_slice(&VERSION.to_be_bytes());
        o.push(section::CONFIGURATION);
        o.extend_from_slice(&(self.machine.len() as u32).to_be_bytes());
        o.extend_from_slice(&self.machine);
        command(&mut o, cmd::OPEN_RETURN_PATH, &[]);
        let mut advise = Vec::new();
        advise.extend_from_slice(&(PAGE as u64).to_be_bytes());
        advise.extend_from_slice(&(PAGE as u64).to_be_bytes());
        command(&mut o, cmd::POSTCOPY_ADVISE, &advise);
        self.section_header(&mut o, section::START);
        let total: u64 = self.blocks.iter().map(|b| b.length).sum();
        o.extend_from_slice(&(total | flag::MEM_SIZE).to_be_bytes());
        for b in &self.blocks {
            o.push(b.id.len() as u8);
            o.extend_from_slice(b.id.as_bytes());
            o.extend_from_slice(&b.length.to_be_bytes());
        }
        o.extend_from_slice(&flag::EOS.to_be_bytes());
        self.section_footer(&mut o);
        if !self.other_pages.is_empty() {
            self.section_header(&mut o, section::PART);
            o.extend_from_slice(&self.other_pages);
            o.extend_from_slice(&flag::EOS.to_be_bytes());
            self.section_footer(&mut o);
        }
        // One discard (of the main block's first page, which is empty
        // anyway) moves QEMU 7.2 into its DISCARD state. Without it, LISTEN
        // runs the "first discard" setup itself, which sets the state back
        // from LISTENING to DISCARD: the listen thread then loads pages
        // the precopy way (memcpy into registered RAM) and hangs.
        let main = self.blocks[self.main].id.as_bytes();
        let mut d = vec![0u8, main.len() as u8];
        d.extend_from_slice(main);
        d.push(0);
        d.extend_from_slice(&0u64.to_be_bytes());
        d.extend_from_slice(&(PAGE as u64).to_be_bytes());
        command(&mut o, cmd::POSTCOPY_RAM_DISCARD, &d);
        o
    }

    /// LISTEN, the device sections and RUN, wrapped in PACKAGED.
    pub(super) fn packaged(&self) -> Vec<u8> {
        let mut inner = Vec::with_capacity(self.devices.len() + 16);
        command(&mut inner, cmd::POSTCOPY_LISTEN, &[]);
        inner.extend_from_slice(&self.devices);
        command(&mut inner, cmd::POSTCOPY_RUN, &[]);
        let mut o = Vec::with_capacity(inner.len() + 16);
        command(&mut o, cmd::PACKAGED, &(inner.len() as u32).to_be_bytes());
        o.extend_from_slice(&inner);
        o
    }

    /// The end: RAM END (EOS) and EOF.
    pub(super) fn tail(&self) -> Vec<u8> {
        let mut tail = Vec::new();
        self.section_header(&mut tail, section::END);
        tail.extend_from_slice(&flag::EOS.to_be_bytes());
        self.section_footer(&mut tail);
        tail.push(section::EOF);
        tail
    }
}

fn command(out: &mut Vec<u8>, cmd: u16, data: &[u8]) {
    out.push(section::COMMAND);
    out.extend_from_slice(&cmd.to_be_bytes());
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// One open PART section of the output.
#[derive(Default)]
pub(super) struct Section {
    open: bool,
    /// Last block written in this section (for CONTINUE).
    last: Option<String>,
}

impl Section {
    pub(super) fn open(&mut self, out: &mut impl Write, state: &SavedState) -> io::Result<()> {
        if !self.open {
            let mut h = Vec::new();
            state.section_header(&mut h, section::PART);
            out.write_all(&h)?;
            self.open = true;
            self.last = None;
        }
        Ok(())
    }
    pub(super) fn record(
        &mut self,
        out: &mut impl Write,
        state: &SavedState,
        block: &str,
        offset: u64,
        kind: u64,
    ) -> io::Result<()> {
        self.open(out, state)?;
        let cont = self.last.as_deref() == Some(block);
        let mut h = Vec::with_capacity(16 + block.len());
        write_ram_header(&mut h, block, offset, kind, cont);
        out.write_all(&h)?;
        self.last = Some(block.to_string());
        Ok(())
    }
    pub(super) fn zero(
        &mut self,
        out: &mut impl Write,
        state: &SavedState,
        block: &str,
        offset: u64,
    ) -> io::Result<()> {
        self.record(out, state, block, offset & !(PAGE as u64 - 1), flag::ZERO)?;
        out.write_all(&[0])
    }
    pub(super) fn close(&mut self, out: &mut impl Write, state: &SavedState) -> io::Result<()> {
        if self.open {
            let mut t = Vec::new();
            t.extend_from_slice(&flag::EOS.to_be_bytes());
            state.section_footer(&mut t);
            out.write_all(&t)?;
            self.open = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::saved::tests::saved;
    use super::*;

    #[test]
    fn writes_the_preamble_and_the_packaged_devices() {
        let st = SavedState::parse(&saved(), "mem").unwrap();
        let pre = st.preamble();
        assert!(pre.starts_with(b"QEVM\0\0\0\x03"));
        // No capability subsection, no per-block address in the setup.
        assert!(!pre.windows(15).any(|w| w == b"x-ignore-shared"));
        let pkg = st.packaged();
        assert_eq!(pkg[0], section::COMMAND);
        assert_eq!(u16::from_be_bytes([pkg[1], pkg[2]]), cmd::PACKAGED);
        let inner_len = u32::from_be_bytes(pkg[5..9].try_into().unwrap()) as usize;
        assert_eq!(pkg.len(), 9 + inner_len);
        assert!(pkg.ends_with(&[section::COMMAND, 0, 5, 0, 0]));
        let tail = st.tail();
        assert_eq!(tail[0], section::END);
        assert_eq!(tail.last(), Some(&section::EOF));
    }

    #[test]
    fn records_continue_within_a_section() {
        let st = SavedState::parse(&saved(), "mem").unwrap();
        let mut out = Vec::new();
        let mut sec = Section::default();
        sec.record(&mut out, &st, "mem", 0, flag::PAGE).unwrap();
        let first = out.len();
        sec.zero(&mut out, &st, "mem", PAGE as u64 + 5).unwrap();
        sec.close(&mut out, &st).unwrap();
        // PART header (5), then a record with the id, then one without.
        assert_eq!(first, 5 + 8 + 4);
        let second = u64::from_be_bytes(out[first..first + 8].try_into().unwrap());
        assert_eq!(second, PAGE as u64 | flag::ZERO | flag::CONTINUE);
        assert_eq!(out[first + 8], 0);
    }
}
