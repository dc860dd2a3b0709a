//! Signed overlays: a signature made by `sign_file` is accepted by a policy
//! that trusts its key, the signed file applies to the same launch state,
//! and an unsigned, a tampered, an expired and a wrong-key overlay are each
//! refused by the prefix alone (before any segment) with what is wrong.

mod common;

use cloudlet_overlay::format::{parse_prefix, Header, HEADER_LEN};
use cloudlet_overlay::signature::{
    sign_file, unix_now, SignatureError, SignaturePolicy, TrustedKey,
};
use cloudlet_overlay::validate::{InvalidOverlay, Validation};
use cloudlet_overlay::{apply_overlay, create_overlay, Codec};
use common::{overlay_path, random_vm};

fn key(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}

fn trusted(signer: &str, k: &ed25519_dalek::SigningKey) -> TrustedKey {
    format!(
        "cloudlet-ed25519 {signer} {}",
        hex::encode(k.verifying_key().to_bytes())
    )
    .parse()
    .unwrap()
}

/// The verdict on `bytes` from its header, signature block and manifest
/// only (no segment given).
fn judge(bytes: &[u8], policy: &SignaturePolicy, now: u64) -> Result<(), InvalidOverlay> {
    let (header, _) = parse_prefix(bytes).map_err(InvalidOverlay::Format)?;
    let prefix = &bytes[..header.manifest_range().end as usize];
    Validation::structure()
        .signatures(policy.clone(), now)
        .check_prefix(prefix, Some(bytes.len() as u64))
        .map(|_| ())
}

/// `overlay` with manifest `m` (hashed anew, the header to match), its
/// signature block and segments as they were: what an attacker makes.
fn rewrite(overlay: &[u8], m: &cloudlet_overlay::Manifest) -> Vec<u8> {
    let (header, old) = parse_prefix(overlay).unwrap();
    let raw = m.encode();
    let stored = zstd::bulk::compress(&raw, 3).unwrap();
    let block = &overlay[HEADER_LEN..header.manifest_offset as usize];
    let segments = &overlay[old.data_offset as usize..];
    let h = Header {
        manifest_len: stored.len() as u64,
        manifest_raw_len: raw.len() as u64,
        file_len: (HEADER_LEN + block.len() + stored.len() + segments.len()) as u64,
        manifest_hash: *blake3::hash(&stored).as_bytes(),
        ..header
    };
    [&h.encode()[..], block, &stored, segments].concat()
}

#[test]
fn signed_overlays_are_judged_before_any_segment() {
    let vm = random_vm(7, 30, 30, 1, 0);
    vm.write();
    let unsigned_path = overlay_path(vm.dir.path());
    create_overlay(&vm.create_config(Codec::default()), &unsigned_path).unwrap();
    let unsigned = std::fs::read(&unsigned_path).unwrap();

    let now = unix_now();
    let acme = key(1);
    let signed_path = vm.path("signed.clo");
    let sig = sign_file(&unsigned_path, &signed_path, &acme, "acme", now, now + 3600).unwrap();
    let signed = std::fs::read(&signed_path).unwrap();
    let (h, _) = parse_prefix(&signed).unwrap();
    let (h0, _) = parse_prefix(&unsigned).unwrap();
    assert_eq!(h.format_version, 2);
    assert_eq!(h.manifest_hash, h0.manifest_hash, "the same manifest");
    assert_eq!(h.manifest_offset, HEADER_LEN as u64 + sig.len());
    assert_eq!(signed.len(), unsigned.len() + sig.len() as usize);

    // Accepted by a policy that trusts acme, whole file checked too; and
    // the signed overlay rebuilds the same launch state.
    let policy = SignaturePolicy {
        required: true,
        trusted: vec![trusted("acme", &acme)],
    };
    judge(&signed, &policy, now).unwrap();
    let v = Validation::full()
        .signatures(policy.clone(), now)
        .check_file(&signed_path)
        .unwrap();
    assert_eq!(v.signature.as_ref().unwrap().signer, "acme");
    apply_overlay(&signed_path, &vm.apply_config()).unwrap();
    vm.check_output();
    // Signed again (a new expiry): the block is replaced, not added.
    let again = sign_file(&signed_path, &signed_path, &acme, "acme", now, now + 7200).unwrap();
    assert_eq!(
        std::fs::metadata(&signed_path).unwrap().len(),
        signed.len() as u64
    );
    assert_eq!(again.expires_at, now + 7200);
    let signed = std::fs::read(&signed_path).unwrap();

    // Unsigned, where signatures are required.
    let e = judge(&unsigned, &policy, now).unwrap_err();
    assert!(
        matches!(e, InvalidOverlay::Signature(SignatureError::Unsigned(_))),
        "{e}"
    );
    assert!(
        e.to_string().contains("acme"),
        "names the trusted keys: {e}"
    );
    // ... but accepted where they are not.
    judge(&unsigned, &SignaturePolicy::default(), now).unwrap();

    // Tampered: the app's command changed in the manifest (hashes made
    // anew, so only the signature can tell).
    let (_, mut m) = parse_prefix(&signed).unwrap();
    m.metadata =
        br#"{"name":"app","ports":[8080],"health_path":"/health","command":"evil"}"#.to_vec();
    let tampered = rewrite(&signed, &m);
    Validation::structure()
        .check_bytes(&tampered)
        .expect("well formed: only the signature can tell");
    let e = judge(&tampered, &policy, now).unwrap_err();
    assert!(
        matches!(
            e,
            InvalidOverlay::Signature(SignatureError::BadSignature { .. })
        ),
        "{e}"
    );
    // Tampered even where no key is trusted: a signature must verify.
    assert!(judge(&tampered, &SignaturePolicy::default(), now).is_err());
    // The expiry pushed out in the block: the signature breaks too.
    let mut later = signed.clone();
    let block_end = h.manifest_offset as usize;
    let expires = block_end - 64 - 8;
    later[expires..expires + 8].copy_from_slice(&(now + 999_999).to_le_bytes());
    let e = judge(&later, &policy, now).unwrap_err();
    assert!(e.to_string().contains("Bad signature by acme"), "{e}");

    // Expired.
    let e = judge(&signed, &policy, now + 7200).unwrap_err();
    assert!(
        matches!(e, InvalidOverlay::Signature(SignatureError::Expired { .. })),
        "{e}"
    );
    // A key nobody trusts (a stranger signing under acme's name too).
    let stranger = vm.path("stranger.clo");
    sign_file(&unsigned_path, &stranger, &key(2), "acme", now, now + 3600).unwrap();
    let e = judge(&std::fs::read(&stranger).unwrap(), &policy, now).unwrap_err();
    assert!(
        matches!(
            e,
            InvalidOverlay::Signature(SignatureError::UnknownKey { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("not among the trusted keys"), "{e}");
    // Rotation: two trusted keys, either accepted.
    let both = SignaturePolicy {
        required: true,
        trusted: vec![trusted("acme", &key(2)), trusted("acme", &acme)],
    };
    judge(&signed, &both, now).unwrap();
    judge(&std::fs::read(&stranger).unwrap(), &both, now).unwrap();

    // A damaged block is a format error, not a panic.
    let mut torn = signed.clone();
    torn[HEADER_LEN + 12] = 200; // the signer id's length
    let e = judge(&torn, &policy, now).unwrap_err();
    assert!(e.to_string().contains("signature block"), "{e}");
}

#[test]
fn dates_are_told_in_utc() {
    use cloudlet_overlay::signature::utc;
    assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
    assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    assert_eq!(utc(1_796_328_324), "2026-12-03 20:05:24 UTC");
}

#[test]
fn trusted_key_lines_are_checked() {
    let k = trusted("ops@acme", &key(3));
    assert_eq!(k.to_string().parse::<TrustedKey>().unwrap(), k);
    for bad in [
        "ed25519 acme 00",
        "cloudlet-ed25519 acme nothex",
        "cloudlet-ed25519 acme 0011",
        "cloudlet-ed25519 a/b 00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
    ] {
        assert!(bad.parse::<TrustedKey>().is_err(), "{bad}");
    }
}
