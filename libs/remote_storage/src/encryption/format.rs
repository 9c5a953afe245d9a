//! The encrypted object format, version 1: a header, then the plaintext cut into chunks, each
//! sealed with AES-256-GCM.
//!
//! ```text
//! offset  size  field
//!  0       4    magic "NEOE"
//!  4       1    format version (1)
//!  5       1    log2 of the chunk length (16: 64 KiB chunks)
//!  6       1    length K of the KEK id
//!  7       1    length D of the data key id
//!  8       8    plaintext length, big-endian
//! 16      32    salt (random per object)
//! 48       7    nonce prefix (random per object)
//! 55       K    KEK id (ASCII): the key-encryption key that wrapped the data key
//! 55+K     D    data key id (ASCII, "<scope>/<32 hex digits>"): which data key encrypted this
//! 55+K+D  ...   chunks: chunk i is AES-256-GCM(object key, nonce_i, plaintext chunk i) with its
//!               16-byte tag; every chunk holds 2^log2 plaintext bytes except the last (an empty
//!               object has one empty chunk)
//! ```
//!
//! - The object key is HKDF-SHA256(salt, data key, info = label ‖ header ‖ object path), so a
//!   change to any header byte, or the object served under another path, yields another key and
//!   the first chunk fails authentication. Deriving a key per object (as Tink's streaming AEAD
//!   does) also means no two objects ever share a (key, nonce) pair, however many objects one
//!   data key encrypts; a random 96-bit nonce per object under one key would only be safe up to
//!   about 2^32 objects.
//! - nonce_i = nonce prefix ‖ i (4 bytes, big-endian) ‖ 1 if i is the last chunk else 0 (the
//!   STREAM construction): reordered chunks fail, and so does a cut at a chunk boundary, since
//!   the chunk before it was not sealed as the last one. The plaintext length in the header also
//!   fixes the exact object size, which readers check first.
//! - Chunks, rather than one AES-GCM message per object, because layers are streamed (hundreds
//!   of MiB) and GCM can only verify a message at its end: with chunks, memory stays at one
//!   chunk, no unverified byte is ever returned, and a ranged read decrypts only the chunks it
//!   covers.
//!
//! Decoding never panics: every length comes from the input and is checked before use.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::config::is_valid_kek_id;

pub const MAGIC: [u8; 4] = *b"NEOE";
pub const FORMAT_VERSION: u8 = 1;
/// 64 KiB: large enough that the 16-byte tag per chunk costs 0.02%, small enough to bound memory.
pub const CHUNK_LEN_LOG2_DEFAULT: u8 = 16;
/// Readers accept chunk lengths in this range, which bounds what a header can make them buffer.
const CHUNK_LEN_LOG2_MIN: u8 = 6;
const CHUNK_LEN_LOG2_MAX: u8 = 20;
pub const TAG_LEN: usize = 16;
pub const SALT_LEN: usize = 32;
pub const NONCE_PREFIX_LEN: usize = 7;
const FIXED_HEADER_LEN: usize = 4 + 1 + 1 + 1 + 1 + 8 + SALT_LEN + NONCE_PREFIX_LEN;
/// Longest data key id: a scope (up to 80 bytes), `/`, 32 hex digits.
pub const DATA_KEY_ID_LEN_MAX: usize = 80 + 1 + 32;
/// No header is longer than this, so a ranged read can fetch the header with one request.
pub const HEADER_LEN_MAX: usize = FIXED_HEADER_LEN + crate::config::KEK_ID_LEN_MAX + DATA_KEY_ID_LEN_MAX;
/// Label at the start of the HKDF info, so object keys can never equal keys derived for
/// another purpose from the same data key.
const OBJECT_KEY_LABEL: &[u8] = b"neon remote storage object key v1\0";

/// Why bytes are not a valid encrypted object (to the reader: an authentication failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatError(pub String);

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn fail<T>(reason: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError(reason.into()))
}

/// Whether `id` is a well-formed data key id: `<scope>/<32 lowercase hex digits>`, the scope
/// made of ASCII letters, digits, `_`, `-` and `.` (it becomes a remote path component).
pub fn is_valid_data_key_id(id: &str) -> bool {
    let Some((scope, random)) = id.split_once('/') else {
        return false;
    };
    is_valid_scope(scope) && random.len() == 32 && random.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `scope` can name a key scope (and so a remote path component).
pub fn is_valid_scope(scope: &str) -> bool {
    !scope.is_empty()
        && scope.len() <= 80
        && scope != "."
        && scope != ".."
        && scope.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The header of one encrypted object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub chunk_len_log2: u8,
    pub plaintext_len: u64,
    pub salt: [u8; SALT_LEN],
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
    pub kek_id: String,
    pub data_key_id: String,
}

impl Header {
    /// A header for a new object of `plaintext_len` bytes with fresh random salt and nonce prefix.
    pub fn new(plaintext_len: u64, kek_id: &str, data_key_id: &str) -> Result<Header, FormatError> {
        use rand::RngCore;
        let mut header = Header {
            chunk_len_log2: CHUNK_LEN_LOG2_DEFAULT,
            plaintext_len,
            salt: [0; SALT_LEN],
            nonce_prefix: [0; NONCE_PREFIX_LEN],
            kek_id: kek_id.to_owned(),
            data_key_id: data_key_id.to_owned(),
        };
        let mut rng = rand::rngs::OsRng;
        rng.fill_bytes(&mut header.salt);
        rng.fill_bytes(&mut header.nonce_prefix);
        header.validate()?;
        Ok(header)
    }

    fn validate(&self) -> Result<(), FormatError> {
        if !(CHUNK_LEN_LOG2_MIN..=CHUNK_LEN_LOG2_MAX).contains(&self.chunk_len_log2) {
            return fail(format!("chunk length 2^{} is outside the supported range", self.chunk_len_log2));
        }
        if !is_valid_kek_id(&self.kek_id) {
            return fail(format!("the header's KEK id {:?} is malformed", self.kek_id));
        }
        if !is_valid_data_key_id(&self.data_key_id) {
            return fail(format!("the header's data key id {:?} is malformed", self.data_key_id));
        }
        // The chunk index must fit the 4 bytes of the nonce.
        if self.chunk_count() > u64::from(u32::MAX) + 1 {
            return fail(format!("plaintext length {} needs more than 2^32 chunks", self.plaintext_len));
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(self.chunk_len_log2);
        out.push(self.kek_id.len() as u8);
        out.push(self.data_key_id.len() as u8);
        out.extend_from_slice(&self.plaintext_len.to_be_bytes());
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.nonce_prefix);
        out.extend_from_slice(self.kek_id.as_bytes());
        out.extend_from_slice(self.data_key_id.as_bytes());
        debug_assert_eq!(out.len(), self.encoded_len());
        out
    }

    /// Decodes the header at the start of `buf`: `Ok(None)` if `buf` is a valid beginning that
    /// is too short, else the header and its encoded length.
    pub fn decode(buf: &[u8]) -> Result<Option<(Header, usize)>, FormatError> {
        let magic_len = buf.len().min(MAGIC.len());
        if buf[..magic_len] != MAGIC[..magic_len] {
            return fail("it does not start with the encrypted-object magic (is it an unencrypted object?)");
        }
        if buf.len() < FIXED_HEADER_LEN {
            if buf.len() > 4 && buf[4] != FORMAT_VERSION {
                return fail(format!("format version {} is not supported (this build reads {FORMAT_VERSION})", buf[4]));
            }
            return Ok(None);
        }
        if buf[4] != FORMAT_VERSION {
            return fail(format!("format version {} is not supported (this build reads {FORMAT_VERSION})", buf[4]));
        }
        let kek_id_len = usize::from(buf[6]);
        let data_key_id_len = usize::from(buf[7]);
        let total = FIXED_HEADER_LEN + kek_id_len + data_key_id_len;
        if buf.len() < total {
            return Ok(None);
        }
        let mut plaintext_len = [0u8; 8];
        plaintext_len.copy_from_slice(&buf[8..16]);
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&buf[16..16 + SALT_LEN]);
        let mut nonce_prefix = [0u8; NONCE_PREFIX_LEN];
        nonce_prefix.copy_from_slice(&buf[48..48 + NONCE_PREFIX_LEN]);
        let ids = &buf[FIXED_HEADER_LEN..total];
        let (kek_id, data_key_id) = ids.split_at(kek_id_len);
        let (Ok(kek_id), Ok(data_key_id)) = (std::str::from_utf8(kek_id), std::str::from_utf8(data_key_id)) else {
            return fail("the header's key ids are not ASCII");
        };
        let header = Header {
            chunk_len_log2: buf[5],
            plaintext_len: u64::from_be_bytes(plaintext_len),
            salt,
            nonce_prefix,
            kek_id: kek_id.to_owned(),
            data_key_id: data_key_id.to_owned(),
        };
        header.validate()?;
        Ok(Some((header, total)))
    }

    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_LEN + self.kek_id.len() + self.data_key_id.len()
    }

    pub fn chunk_len(&self) -> u64 {
        1u64 << self.chunk_len_log2
    }

    /// At least one: an empty object has one empty chunk, so it too carries a tag.
    pub fn chunk_count(&self) -> u64 {
        self.plaintext_len.div_ceil(self.chunk_len()).max(1)
    }

    /// Plaintext bytes in chunk `index` (< chunk_count).
    pub fn chunk_plaintext_len(&self, index: u64) -> usize {
        let start = index * self.chunk_len();
        (self.plaintext_len - start).min(self.chunk_len()) as usize
    }

    /// Offset of chunk `index` in the object.
    pub fn chunk_offset(&self, index: u64) -> u64 {
        self.encoded_len() as u64 + index * (self.chunk_len() + TAG_LEN as u64)
    }

    /// The exact size of the whole encrypted object.
    pub fn object_len(&self) -> u64 {
        self.encoded_len() as u64 + self.plaintext_len + self.chunk_count() * TAG_LEN as u64
    }
}

/// Seals and opens the chunks of one object.
pub struct ObjectCipher {
    aead: Aes256Gcm,
    header: Header,
}

impl ObjectCipher {
    /// `header_bytes` must be `header.encode()` as stored (a reader passes the bytes it read);
    /// `path` is the object's key, which the object key is bound to.
    pub fn new(data_key: &[u8; 32], header: Header, header_bytes: &[u8], path: &str) -> ObjectCipher {
        let hkdf = Hkdf::<Sha256>::new(Some(&header.salt), data_key);
        let mut object_key = Zeroizing::new([0u8; 32]);
        hkdf.expand_multi_info(&[OBJECT_KEY_LABEL, header_bytes, path.as_bytes()], object_key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let aead = Aes256Gcm::new_from_slice(object_key.as_ref()).expect("the key is 32 bytes");
        ObjectCipher { aead, header }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn nonce(&self, index: u64) -> [u8; 12] {
        let mut nonce = [0u8; 12];
        nonce[..NONCE_PREFIX_LEN].copy_from_slice(&self.header.nonce_prefix);
        // `Header::validate` keeps the chunk count within u32 + 1, so the index fits.
        nonce[NONCE_PREFIX_LEN..11].copy_from_slice(&(index as u32).to_be_bytes());
        nonce[11] = u8::from(index + 1 == self.header.chunk_count());
        nonce
    }

    /// Encrypts chunk `index` in place and appends its tag.
    pub fn seal_chunk(&self, index: u64, chunk: &mut Vec<u8>) {
        assert_eq!(chunk.len(), self.header.chunk_plaintext_len(index), "chunk {index} has the wrong length");
        let nonce = self.nonce(index);
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), &[], chunk)
            .expect("AES-GCM encrypts messages up to 64 GiB; chunks are at most 1 MiB");
        chunk.extend_from_slice(&tag);
    }

    /// Verifies and decrypts chunk `index` (ciphertext with its tag) in place, leaving the
    /// plaintext.
    pub fn open_chunk(&self, index: u64, chunk: &mut Vec<u8>) -> Result<(), FormatError> {
        if index >= self.header.chunk_count() {
            return fail(format!("chunk {index} is beyond the object's {} chunks", self.header.chunk_count()));
        }
        let expected_len = self.header.chunk_plaintext_len(index) + TAG_LEN;
        if chunk.len() != expected_len {
            return fail(format!("chunk {index} is {} bytes, expected {expected_len}", chunk.len()));
        }
        let tag_start = chunk.len() - TAG_LEN;
        let tag = Tag::clone_from_slice(&chunk[tag_start..]);
        chunk.truncate(tag_start);
        let nonce = self.nonce(index);
        self.aead
            .decrypt_in_place_detached(Nonce::from_slice(&nonce), &[], chunk, &tag)
            .or_else(|_| fail(format!("chunk {index} of {} does not verify", self.header.chunk_count())))
    }
}

/// Encrypts a whole object in memory (tests, and small objects).
pub fn seal_object(data_key: &[u8; 32], header: Header, path: &str, plaintext: &[u8]) -> Vec<u8> {
    assert_eq!(header.plaintext_len, plaintext.len() as u64);
    let header_bytes = header.encode();
    let cipher = ObjectCipher::new(data_key, header, &header_bytes, path);
    let mut out = header_bytes;
    for index in 0..cipher.header.chunk_count() {
        let start = (index * cipher.header.chunk_len()) as usize;
        let mut chunk = plaintext[start..start + cipher.header.chunk_plaintext_len(index)].to_vec();
        cipher.seal_chunk(index, &mut chunk);
        out.extend_from_slice(&chunk);
    }
    out
}

/// Decrypts a whole object in memory, the data key found through `data_key` (given the
/// header). Checks the exact length and every chunk.
pub fn open_object(
    data_key: impl FnOnce(&Header) -> Option<[u8; 32]>,
    path: &str,
    object: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let Some((header, header_len)) = Header::decode(object)? else {
        return fail(format!("the object ends inside its header ({} bytes)", object.len()));
    };
    if header.object_len() != object.len() as u64 {
        return fail(format!("the object is {} bytes, its header implies {}", object.len(), header.object_len()));
    }
    let Some(key) = data_key(&header) else {
        return fail(format!("no data key {}", header.data_key_id));
    };
    let cipher = ObjectCipher::new(&key, header, &object[..header_len], path);
    let mut plaintext = Vec::with_capacity(cipher.header.plaintext_len as usize);
    let mut offset = header_len;
    for index in 0..cipher.header.chunk_count() {
        let chunk_len = cipher.header.chunk_plaintext_len(index) + TAG_LEN;
        let mut chunk = object[offset..offset + chunk_len].to_vec();
        cipher.open_chunk(index, &mut chunk)?;
        plaintext.extend_from_slice(&chunk);
        offset += chunk_len;
    }
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const KEY: [u8; 32] = [7; 32];
    const DKID: &str = "tenant-abc/0123456789abcdef0123456789abcdef";

    fn small_header(len: usize) -> Header {
        // Small chunks so that short test objects have several.
        Header { chunk_len_log2: 6, ..Header::new(len as u64, "k1", DKID).unwrap() }
    }

    fn plaintext(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn round_trip_and_sizes() {
        for len in [0, 1, 63, 64, 65, 200, 1000] {
            let header = small_header(len);
            let object = seal_object(&KEY, header.clone(), "p/x", &plaintext(len));
            assert_eq!(object.len() as u64, header.object_len(), "len {len}");
            assert_eq!(open_object(|_| Some(KEY), "p/x", &object).unwrap(), plaintext(len), "len {len}");
            let (decoded, header_len) = Header::decode(&object).unwrap().unwrap();
            assert_eq!((decoded, header_len), (header.clone(), header.encoded_len()));
            // Every proper prefix of the header asks for more bytes.
            for cut in 0..header_len {
                assert_eq!(Header::decode(&object[..cut]), Ok(None), "cut {cut}");
            }
        }
        const { assert!(HEADER_LEN_MAX < 512) };
    }

    #[test]
    fn the_default_format_has_64k_chunks() {
        let header = Header::new(200_000, "k1", DKID).unwrap();
        assert_eq!(header.chunk_len(), 65536);
        assert_eq!(header.chunk_count(), 4);
        assert_eq!(header.object_len(), header.encoded_len() as u64 + 200_000 + 4 * 16);
    }

    #[test]
    fn wrong_key_or_path_fails() {
        let object = seal_object(&KEY, small_header(100), "p/x", &plaintext(100));
        assert!(open_object(|_| Some([8; 32]), "p/x", &object).unwrap_err().0.contains("does not verify"));
        // The same bytes served under another path do not verify either.
        assert!(open_object(|_| Some(KEY), "p/y", &object).is_err());
    }

    #[test]
    fn every_flipped_bit_and_every_truncation_fails() {
        let object = seal_object(&KEY, small_header(150), "p/x", &plaintext(150));
        for i in 0..object.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = object.clone();
                bad[i] ^= bit;
                assert!(
                    open_object(|_| Some(KEY), "p/x", &bad).is_err(),
                    "flip of byte {i} bit {bit:#x} went unnoticed"
                );
            }
        }
        for len in 0..object.len() {
            assert!(open_object(|_| Some(KEY), "p/x", &object[..len]).is_err(), "truncation to {len} went unnoticed");
        }
        let mut longer = object.clone();
        longer.push(0);
        assert!(open_object(|_| Some(KEY), "p/x", &longer).is_err());
    }

    #[test]
    fn reordered_or_dropped_chunks_fail_even_with_a_fixed_up_length() {
        let header = small_header(192); // three full chunks
        let object = seal_object(&KEY, header.clone(), "p/x", &plaintext(192));
        let header_len = header.encoded_len();
        let chunk = 64 + TAG_LEN;
        let chunks: Vec<&[u8]> = object[header_len..].chunks(chunk).collect();
        // Swapped chunks.
        let swapped = [&object[..header_len], chunks[1], chunks[0], chunks[2]].concat();
        assert!(open_object(|_| Some(KEY), "p/x", &swapped).is_err());
        // Last chunk dropped and the header's length rewritten: the header no longer verifies
        // (it is bound into the object key), and chunk 1 was not sealed as the last one anyway.
        let mut short_header = Header { plaintext_len: 128, ..header.clone() }.encode();
        short_header.extend_from_slice(chunks[0]);
        short_header.extend_from_slice(chunks[1]);
        assert!(open_object(|_| Some(KEY), "p/x", &short_header).is_err());
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        let valid = seal_object(&KEY, small_header(300), "p/x", &plaintext(300));
        for round in 0..20_000 {
            let bytes: Vec<u8> = match round % 3 {
                // Pure noise, sometimes with the right magic and version.
                0 => {
                    let len = rng.gen_range(0..600);
                    let mut b: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    if round % 2 == 0 && b.len() >= 5 {
                        b[..4].copy_from_slice(&MAGIC);
                        b[4] = FORMAT_VERSION;
                    }
                    b
                }
                // A valid object with a few random bytes changed.
                1 => {
                    let mut b = valid.clone();
                    for _ in 0..rng.gen_range(1..4) {
                        let i = rng.gen_range(0..b.len());
                        b[i] = rng.gen();
                    }
                    b
                }
                // A valid object cut or extended at random.
                _ => {
                    let mut b = valid.clone();
                    b.resize(rng.gen_range(0..valid.len() + 50), rng.gen());
                    b
                }
            };
            let _ = Header::decode(&bytes);
            if bytes != valid {
                assert!(open_object(|_| Some(KEY), "p/x", &bytes).is_err(), "round {round} decrypted a changed object");
            }
        }
    }

    #[test]
    fn header_validation() {
        assert!(Header::new(0, "bad/id", DKID).is_err());
        assert!(Header::new(0, "k1", "no-slash").is_err());
        assert!(Header::new(0, "k1", "s/0123").is_err());
        assert!(Header::new(0, "k1", "../0123456789abcdef0123456789abcdef").is_err());
        assert!(is_valid_data_key_id(DKID));
        let mut bytes = Header::new(10, "k1", DKID).unwrap().encode();
        bytes[4] = 2;
        assert!(Header::decode(&bytes).unwrap_err().0.contains("format version 2"));
        assert!(Header::decode(b"plain text").unwrap_err().0.contains("unencrypted"));
    }
}
