//! A minimal reader for the zip container of PyTorch `.pth` files.
//!
//! `torch.save` writes every entry uncompressed ("stored"), so an entry's bytes can be used in
//! place from a memory map. Only the central directory is parsed; compressed entries are
//! reported, never inflated. Zip64 sizes and offsets are supported (checkpoints over 4 GiB).

use crate::error::{Error, Result};

/// One stored entry: its name and the byte range of its data within the archive.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The entry's path inside the archive.
    pub name: String,
    /// Offset of the first data byte from the start of the archive.
    pub offset: usize,
    /// Number of data bytes.
    pub len: usize,
}

/// `n` bytes at `at`, if the file has them (`at` may be any offset a file claims).
fn bytes_at(b: &[u8], at: usize, n: usize) -> Option<&[u8]> {
    b.get(at..at.checked_add(n)?)
}
fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    bytes_at(b, at, 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    bytes_at(b, at, 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    bytes_at(b, at, 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// Lists the entries of a zip archive held in memory. `what` names the file in errors.
pub fn entries(buf: &[u8], what: &str) -> Result<Vec<Entry>> {
    let bad = |m: &str| Error::bad(format!("{what}: not a valid PyTorch zip checkpoint: {m}"));
    // The end-of-central-directory record sits in the last 22 + 65535 bytes.
    let min_start = buf.len().saturating_sub(22 + 65535);
    let mut eocd = None;
    let mut i = buf.len().saturating_sub(22);
    loop {
        if u32_at(buf, i) == Some(0x0605_4b50) {
            eocd = Some(i);
            break;
        }
        if i == min_start || i == 0 {
            break;
        }
        i -= 1;
    }
    let eocd = eocd.ok_or_else(|| bad("end of central directory not found (truncated file?)"))?;
    let mut count = u16_at(buf, eocd + 10).ok_or_else(|| bad("short EOCD"))? as u64;
    let mut cd_size = u32_at(buf, eocd + 12).ok_or_else(|| bad("short EOCD"))? as u64;
    let mut cd_off = u32_at(buf, eocd + 16).ok_or_else(|| bad("short EOCD"))? as u64;
    if count == 0xFFFF || cd_size == 0xFFFF_FFFF || cd_off == 0xFFFF_FFFF {
        // Zip64: the locator sits just before the EOCD and points at the zip64 EOCD record.
        let loc = eocd
            .checked_sub(20)
            .ok_or_else(|| bad("missing zip64 locator"))?;
        if u32_at(buf, loc) != Some(0x0706_4b50) {
            return Err(bad("missing zip64 locator"));
        }
        let z = u64_at(buf, loc + 8).ok_or_else(|| bad("short zip64 locator"))? as usize;
        if u32_at(buf, z) != Some(0x0606_4b50) {
            return Err(bad("bad zip64 end of central directory"));
        }
        count = u64_at(buf, z + 32).ok_or_else(|| bad("short zip64 EOCD"))?;
        cd_size = u64_at(buf, z + 40).ok_or_else(|| bad("short zip64 EOCD"))?;
        cd_off = u64_at(buf, z + 48).ok_or_else(|| bad("short zip64 EOCD"))?;
    }
    let cd_end = cd_off
        .checked_add(cd_size)
        .filter(|&e| e <= buf.len() as u64)
        .ok_or_else(|| bad("central directory lies outside the file (truncated file?)"))?;
    let mut out = Vec::new();
    let mut p = cd_off as usize;
    for _ in 0..count {
        if p + 46 > cd_end as usize || u32_at(buf, p) != Some(0x0201_4b50) {
            return Err(bad("corrupt central directory"));
        }
        let method = u16_at(buf, p + 10).unwrap_or(0);
        let mut csize = u32_at(buf, p + 20).unwrap_or(0) as u64;
        let mut usize_ = u32_at(buf, p + 24).unwrap_or(0) as u64;
        let name_len = u16_at(buf, p + 28).unwrap_or(0) as usize;
        let extra_len = u16_at(buf, p + 30).unwrap_or(0) as usize;
        let comment_len = u16_at(buf, p + 32).unwrap_or(0) as usize;
        let mut local = u32_at(buf, p + 42).unwrap_or(0) as u64;
        let name_bytes = buf
            .get(p + 46..p + 46 + name_len)
            .ok_or_else(|| bad("corrupt central directory"))?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        // Zip64 extended information: present fields appear in a fixed order.
        let extra = buf
            .get(p + 46 + name_len..p + 46 + name_len + extra_len)
            .ok_or_else(|| bad("corrupt central directory"))?;
        let mut e = 0;
        while e + 4 <= extra.len() {
            let id = u16_at(extra, e).unwrap_or(0);
            let sz = u16_at(extra, e + 2).unwrap_or(0) as usize;
            if id == 0x0001 {
                let mut q = e + 4;
                if usize_ == 0xFFFF_FFFF {
                    usize_ = u64_at(extra, q).ok_or_else(|| bad("short zip64 field"))?;
                    q += 8;
                }
                if csize == 0xFFFF_FFFF {
                    csize = u64_at(extra, q).ok_or_else(|| bad("short zip64 field"))?;
                    q += 8;
                }
                if local == 0xFFFF_FFFF {
                    local = u64_at(extra, q).ok_or_else(|| bad("short zip64 field"))?;
                }
            }
            e += 4 + sz;
        }
        if method != 0 {
            return Err(bad(&format!(
                "entry {name} is compressed (method {method}); re-save it with torch.save"
            )));
        }
        let l = local as usize;
        if u32_at(buf, l) != Some(0x0403_4b50) {
            return Err(bad(&format!(
                "entry {name}: bad local header (truncated file?)"
            )));
        }
        let lname = u16_at(buf, l + 26).unwrap_or(0) as usize;
        let lextra = u16_at(buf, l + 28).unwrap_or(0) as usize;
        let offset = l + 30 + lname + lextra;
        let len = csize.min(usize_) as usize;
        if offset.checked_add(len).is_none_or(|end| end > buf.len()) {
            return Err(bad(&format!(
                "entry {name} extends past the end of the file (truncated file?)"
            )));
        }
        out.push(Entry { name, offset, len });
        p += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}
