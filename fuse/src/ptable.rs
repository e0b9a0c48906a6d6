//! Partition tables: MBR (with extended/logical partitions) and GPT.
//!
//! Parsed by hand: both formats are small and fixed, and the bytes come from
//! a guest, so every offset and count is checked and nothing is trusted to be
//! in range. Numbers follow the guest's own naming, so `part1` is what the
//! guest calls `/dev/vda1`, and logical MBR partitions start at 5.

use ekko::Result;

/// One partition, in bytes from the start of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    /// What the table says it holds, for log lines: `mbr 0x83`, `gpt <guid>`.
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    /// No partition table: the whole disk may hold one filesystem.
    None,
    Mbr(Vec<Partition>),
    Gpt(Vec<Partition>),
}

const SECTOR: u64 = 512;
/// More than any real table; bounds the work a hostile one can cause.
const MAX_GPT_ENTRIES: u32 = 1024;
const MAX_LOGICAL: u32 = 128;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Read and parse the partition table of a disk of `size` bytes through
/// `read(buf, offset)`.
pub fn parse(read: &dyn Fn(&mut [u8], u64) -> Result<()>, size: u64) -> Result<Table> {
    if size < SECTOR * 2 {
        return Ok(Table::None);
    }
    let mut mbr = [0u8; 512];
    read(&mut mbr, 0)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(Table::None);
    }
    let entries: Vec<MbrEntry> = (0..4)
        .map(|i| MbrEntry::parse(&mbr[446 + 16 * i..462 + 16 * i]))
        .collect();
    // A boot sector of a filesystem (FAT) also ends in 55 AA; real partition
    // entries have a status of 0 or 0x80.
    if entries.iter().any(|e| e.status != 0 && e.status != 0x80) {
        return Ok(Table::None);
    }
    if entries.iter().any(|e| e.kind == 0xee) {
        for sector_size in [SECTOR, 4096] {
            if let Some(parts) = parse_gpt(read, size, sector_size)? {
                return Ok(Table::Gpt(parts));
            }
        }
        tracing::warn!("protective MBR without a valid GPT header; using the MBR entries");
    }
    let mut parts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let number = u32::try_from(i).expect("4 entries") + 1;
        if e.kind == 0 || e.kind == 0xee || e.sectors == 0 {
            continue;
        }
        if matches!(e.kind, 0x05 | 0x0f | 0x85) {
            parse_logical(read, size, u64::from(e.start), &mut parts)?;
            continue;
        }
        if let Some(p) = clip(
            number,
            u64::from(e.start),
            u64::from(e.sectors),
            SECTOR,
            size,
            format!("mbr {:#04x}", e.kind),
        ) {
            parts.push(p);
        }
    }
    if parts.is_empty() && entries.iter().all(|e| e.kind == 0) {
        return Ok(Table::None);
    }
    parts.sort_by_key(|p| p.number);
    Ok(Table::Mbr(parts))
}

struct MbrEntry {
    status: u8,
    kind: u8,
    start: u32,
    sectors: u32,
}

impl MbrEntry {
    fn parse(b: &[u8]) -> MbrEntry {
        MbrEntry {
            status: b[0],
            kind: b[4],
            start: u32_at(b, 8),
            sectors: u32_at(b, 12),
        }
    }
}

/// A partition of `count` sectors from `start`, cut to the disk's end; `None`
/// when it lies entirely outside the disk.
fn clip(
    number: u32,
    start: u64,
    count: u64,
    sector: u64,
    disk: u64,
    kind: String,
) -> Option<Partition> {
    let offset = start.checked_mul(sector)?;
    if offset >= disk || count == 0 {
        return None;
    }
    let size = count.saturating_mul(sector).min(disk - offset);
    Some(Partition {
        number,
        offset,
        size,
        kind,
    })
}

/// Walk the chain of extended boot records that starts at LBA `ext_start`.
fn parse_logical(
    read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    size: u64,
    ext_start: u64,
    out: &mut Vec<Partition>,
) -> Result<()> {
    let mut ebr_lba = ext_start;
    let mut seen = std::collections::HashSet::new();
    let mut number = 5;
    while number < 5 + MAX_LOGICAL && seen.insert(ebr_lba) {
        let Some(off) = ebr_lba
            .checked_mul(SECTOR)
            .filter(|o| o.saturating_add(SECTOR) <= size)
        else {
            break;
        };
        let mut ebr = [0u8; 512];
        read(&mut ebr, off)?;
        if ebr[510..512] != [0x55, 0xaa] {
            break;
        }
        let this = MbrEntry::parse(&ebr[446..462]);
        let next = MbrEntry::parse(&ebr[462..478]);
        if this.kind != 0 && this.sectors != 0 {
            if let Some(p) = clip(
                number,
                ebr_lba.saturating_add(u64::from(this.start)),
                u64::from(this.sectors),
                SECTOR,
                size,
                format!("mbr {:#04x}", this.kind),
            ) {
                out.push(p);
            }
            number += 1;
        }
        if next.start == 0 || !matches!(next.kind, 0x05 | 0x0f | 0x85) {
            break;
        }
        ebr_lba = ext_start.saturating_add(u64::from(next.start));
    }
    Ok(())
}

/// The GPT at LBA 1 (or, if that one is damaged, its backup), or `None`.
fn parse_gpt(
    read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    size: u64,
    sector: u64,
) -> Result<Option<Vec<Partition>>> {
    let last_lba = size / sector - 1;
    for lba in [1, last_lba] {
        if let Some(parts) = parse_gpt_at(read, size, sector, lba)? {
            return Ok(Some(parts));
        }
    }
    Ok(None)
}

fn parse_gpt_at(
    read: &dyn Fn(&mut [u8], u64) -> Result<()>,
    size: u64,
    sector: u64,
    lba: u64,
) -> Result<Option<Vec<Partition>>> {
    let Some(off) = lba
        .checked_mul(sector)
        .filter(|o| o.saturating_add(sector) <= size)
    else {
        return Ok(None);
    };
    let mut hdr = vec![0u8; usize::try_from(sector).expect("small")];
    read(&mut hdr, off)?;
    if &hdr[..8] != b"EFI PART" {
        return Ok(None);
    }
    let hsize = usize::try_from(u32_at(&hdr, 12)).unwrap_or(0);
    if !(92..=hdr.len()).contains(&hsize) {
        return Ok(None);
    }
    let mut h = hdr[..hsize].to_vec();
    let want_crc = u32_at(&h, 16);
    h[16..20].fill(0);
    if crc32(&h) != want_crc {
        tracing::warn!("GPT header at LBA {lba} has a bad checksum; ignoring it");
        return Ok(None);
    }
    let entries_lba = u64_at(&hdr, 72);
    let count = u32_at(&hdr, 80);
    let esize = u32_at(&hdr, 84);
    if count > MAX_GPT_ENTRIES || !(128..=4096).contains(&esize) || esize & 7 != 0 {
        return Ok(None);
    }
    let total = u64::from(count) * u64::from(esize);
    let Some(eoff) = entries_lba
        .checked_mul(sector)
        .filter(|o| o.saturating_add(total) <= size)
    else {
        return Ok(None);
    };
    let mut table = vec![0u8; usize::try_from(total).expect("at most 4 MiB")];
    read(&mut table, eoff)?;
    if crc32(&table) != u32_at(&hdr, 88) {
        tracing::warn!(
            "GPT partition entries for the header at LBA {lba} have a bad checksum; ignoring them"
        );
        return Ok(None);
    }
    let esize = usize::try_from(esize).expect("small");
    let mut parts = Vec::new();
    for (i, e) in table.chunks_exact(esize).enumerate() {
        let type_guid = &e[..16];
        if type_guid.iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        if last < first {
            continue;
        }
        let number = u32::try_from(i).expect("at most 1024") + 1;
        if let Some(p) = clip(
            number,
            first,
            last - first + 1,
            sector,
            size,
            format!("gpt {}", guid(type_guid)),
        ) {
            parts.push(p);
        }
    }
    Ok(Some(parts))
}

/// A GUID in its usual text form (the first three fields are little-endian).
fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        u32_at(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

/// CRC-32 (IEEE), as GPT uses it. Bitwise: tables are a few KiB at most.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(img: &[u8]) -> impl Fn(&mut [u8], u64) -> Result<()> + '_ {
        move |buf, off| {
            let off = usize::try_from(off).unwrap();
            buf.copy_from_slice(&img[off..off + buf.len()]);
            Ok(())
        }
    }

    fn mbr_entry(img: &mut [u8], at: usize, kind: u8, start: u32, sectors: u32) {
        img[at + 4] = kind;
        img[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        img[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
    }

    #[test]
    fn crc_matches_the_reference_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn blank_disk_has_no_table() {
        let img = vec![0u8; 1 << 20];
        assert_eq!(parse(&reader(&img), 1 << 20).unwrap(), Table::None);
    }

    #[test]
    fn mbr_with_logical_partitions() {
        let mut img = vec![0u8; 8 << 20];
        img[510] = 0x55;
        img[511] = 0xaa;
        mbr_entry(&mut img, 446, 0x83, 2048, 2048);
        mbr_entry(&mut img, 462, 0x05, 4096, 8192);
        // EBR 1 at LBA 4096: logical at +2048, next EBR at ext+4096.
        let e1 = 4096 * 512;
        img[e1 + 510] = 0x55;
        img[e1 + 511] = 0xaa;
        mbr_entry(&mut img, e1 + 446, 0x83, 2048, 1024);
        mbr_entry(&mut img, e1 + 462, 0x05, 4096, 4096);
        let e2 = 8192 * 512;
        img[e2 + 510] = 0x55;
        img[e2 + 511] = 0xaa;
        mbr_entry(&mut img, e2 + 446, 0x82, 2048, 100_000); // runs past the disk: clipped
        let t = parse(&reader(&img), 8 << 20).unwrap();
        let Table::Mbr(p) = t else { panic!("{t:?}") };
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].number, p[0].offset, p[0].size),
            (1, 2048 * 512, 2048 * 512)
        );
        assert_eq!(
            (p[1].number, p[1].offset, p[1].size),
            (5, 6144 * 512, 1024 * 512)
        );
        assert_eq!((p[2].number, p[2].offset), (6, 10240 * 512));
        assert_eq!(p[2].offset + p[2].size, 8 << 20);
    }

    #[test]
    fn fat_boot_sector_is_not_a_table() {
        let mut img = vec![0u8; 1 << 20];
        img[510] = 0x55;
        img[511] = 0xaa;
        img[446] = 0x33; // boot code, not a status byte
        assert_eq!(parse(&reader(&img), 1 << 20).unwrap(), Table::None);
    }

    #[test]
    fn gpt_primary_then_backup() {
        let size = 4u64 << 20;
        let mut img = vec![0u8; usize::try_from(size).unwrap()];
        img[510] = 0x55;
        img[511] = 0xaa;
        mbr_entry(&mut img, 446, 0xee, 1, 0xffff_ffff);
        let entries_at = 2 * 512;
        let mut entries = vec![0u8; 128 * 128];
        entries[0] = 0xaf; // any non-zero type GUID
        entries[32..40].copy_from_slice(&2048u64.to_le_bytes());
        entries[40..48].copy_from_slice(&4095u64.to_le_bytes());
        img[entries_at..entries_at + entries.len()].copy_from_slice(&entries);
        let mut hdr = vec![0u8; 92];
        hdr[..8].copy_from_slice(b"EFI PART");
        hdr[12..16].copy_from_slice(&92u32.to_le_bytes());
        hdr[72..80].copy_from_slice(&2u64.to_le_bytes());
        hdr[80..84].copy_from_slice(&128u32.to_le_bytes());
        hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
        hdr[88..92].copy_from_slice(&crc32(&entries).to_le_bytes());
        let c = crc32(&hdr);
        hdr[16..20].copy_from_slice(&c.to_le_bytes());
        // Only the backup header is intact.
        let last = usize::try_from(size - 512).unwrap();
        img[last..last + 92].copy_from_slice(&hdr);
        img[512..512 + 8].copy_from_slice(b"EFI PART");
        let t = parse(&reader(&img), size).unwrap();
        let Table::Gpt(p) = t else { panic!("{t:?}") };
        assert_eq!(
            p,
            vec![Partition {
                number: 1,
                offset: 2048 * 512,
                size: 2048 * 512,
                kind: p[0].kind.clone()
            }]
        );
    }
}
