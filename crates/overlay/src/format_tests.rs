//! Unit tests of the format: headers, manifests, their bounds.

use super::*;

#[test]
fn header_roundtrip() {
    let h = Header {
        format_version: FORMAT_VERSION,
        manifest_offset: HEADER_LEN as u64,
        manifest_len: 10,
        manifest_raw_len: 20,
        file_len: 1000,
        manifest_hash: [7; 32],
    };
    let b = h.encode();
    assert_eq!(Header::parse(&b).unwrap(), h);
    let mut c = b;
    c[0] ^= 1;
    assert_eq!(Header::parse(&c), Err(FormatError::BadMagic));
    let mut c = b;
    c[8] = 3;
    assert!(matches!(
        Header::parse(&c),
        Err(FormatError::UnsupportedVersion { found: 3, .. })
    ));
    // Version 2 (signed) needs a signature block before the manifest;
    // version 1 none.
    let signed = Header {
        format_version: SIGNED_FORMAT_VERSION,
        ..h.clone()
    };
    assert!(Header::parse(&signed.encode()).is_err());
    let signed = Header {
        manifest_offset: HEADER_LEN as u64 + 140,
        ..signed
    };
    assert_eq!(Header::parse(&signed.encode()).unwrap(), signed);
    let unsigned_with_block = Header {
        format_version: FORMAT_VERSION,
        ..signed
    };
    assert!(Header::parse(&unsigned_with_block.encode()).is_err());
    let mut c = b;
    c[30] ^= 1;
    assert_eq!(Header::parse(&c), Err(FormatError::HeaderHashMismatch));
    for n in 0..HEADER_LEN {
        assert!(Header::parse(&b[..n]).is_err());
    }
}

#[test]
fn metadata_length_is_bounded() {
    let mut raw = Vec::new();
    raw.extend_from_slice(&4096u32.to_le_bytes());
    raw.extend_from_slice(&0u16.to_le_bytes());
    raw.extend_from_slice(&((MAX_METADATA_LEN + 1) as u32).to_le_bytes());
    raw.extend(std::iter::repeat(b'a').take(MAX_METADATA_LEN + 1));
    let err = Manifest::decode(&raw).unwrap_err();
    assert!(err.to_string().contains("metadata length"), "{err}");
    // Shorter than announced: refused, no panic.
    let mut raw = raw[..6].to_vec();
    raw.extend_from_slice(&100u32.to_le_bytes());
    raw.extend_from_slice(b"short");
    assert!(Manifest::decode(&raw).is_err());
}

#[test]
fn chunk_lengths() {
    assert_eq!(chunk_count(0, 4096), 0);
    assert_eq!(chunk_count(4097, 4096), 2);
    assert_eq!(chunk_len(4097, 4096, 1), 1);
    assert_eq!(chunk_len(4097, 4096, 2), 0);
    assert_eq!(chunk_len(4097, 4096, u64::MAX), 0);
}
