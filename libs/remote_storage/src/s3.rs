//! `S3Bucket`: objects in an S3 bucket (AWS, MinIO, moto), under an optional key prefix.
//!
//! Every request goes through [`retry`] (the SDK's own retries are off) and holds a permit of a
//! per-bucket semaphore, so one busy tenant cannot open thousands of connections. Uploads up to
//! `upload_part_size_bytes` are buffered and sent with one `PutObject`; longer ones are streamed
//! as a multipart upload, one buffered part at a time, so every request body can be replayed on
//! retry while memory stays bounded by one part.

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::retry::{retry, AttemptError};
use crate::{
    finish_listing, ByteStream, DeleteFailure, Download, Listing, ListingMode, RemotePath, RemoteStorage,
    RemoteStorageError, RetrySettings, S3Config, DELETE_BATCH_KEYS_MAX,
};

/// S3 returns at most this many keys per `ListObjectsV2` page.
const LIST_PAGE_KEYS_MAX: usize = 1000;

/// A bucket (and key prefix in it) holding the objects.
#[derive(Clone)]
pub struct S3Bucket {
    client: Client,
    bucket_name: String,
    /// Without surrounding slashes; keys are `<prefix_in_bucket>/<key>`.
    prefix_in_bucket: Option<String>,
    concurrency_limit: Arc<Semaphore>,
    retry_settings: RetrySettings,
    upload_part_size_bytes: usize,
}

impl std::fmt::Debug for S3Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Bucket")
            .field("bucket_name", &self.bucket_name)
            .field("prefix_in_bucket", &self.prefix_in_bucket)
            .finish_non_exhaustive()
    }
}

impl S3Bucket {
    /// Connects with credentials from the standard AWS chain (env vars, profile, IMDS, ...).
    pub async fn new(config: &S3Config) -> anyhow::Result<Self> {
        Self::build(config, None).await
    }

    /// Connects with explicit credentials (tests, or secrets read from elsewhere).
    pub async fn with_credentials(config: &S3Config, credentials: Credentials) -> anyhow::Result<Self> {
        Self::build(config, Some(credentials)).await
    }

    async fn build(config: &S3Config, credentials: Option<Credentials>) -> anyhow::Result<Self> {
        let mut loader =
            aws_config::defaults(BehaviorVersion::latest()).region(Region::new(config.bucket_region.clone()));
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let sdk_config = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk_config)
            // Our `retry` is the only retry loop; SDK retries would multiply with it.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.connect_timeout())
                    .operation_attempt_timeout(config.request_timeout())
                    .build(),
            )
            // Only checksum where S3 requires it: S3-compatible stores (older MinIO, moto) do not
            // all understand the newer default checksum headers.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &config.endpoint {
            // Custom endpoints (MinIO, moto) rarely have per-bucket DNS names.
            builder = builder.endpoint_url(endpoint).force_path_style(true);
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket_name: config.bucket_name.clone(),
            prefix_in_bucket: config.prefix_in_bucket.clone(),
            concurrency_limit: Arc::new(Semaphore::new(config.concurrency_limit.get())),
            retry_settings: config.retry_settings(),
            upload_part_size_bytes: config.upload_part_size_bytes,
        })
    }

    /// Overrides the retry attempts and backoff derived from the config.
    pub fn with_retry_settings(mut self, retry_settings: RetrySettings) -> Self {
        self.retry_settings = retry_settings;
        self
    }

    pub fn bucket_name(&self) -> &str {
        &self.bucket_name
    }

    /// The object key in the bucket for `path`.
    pub fn object_key(&self, path: &RemotePath) -> String {
        match &self.prefix_in_bucket {
            Some(prefix) => format!("{prefix}/{path}"),
            None => path.as_str().to_owned(),
        }
    }

    /// `s3://bucket/<object key of path>`, for error messages.
    pub(crate) fn location_of(&self, path: &RemotePath) -> String {
        self.location(&self.object_key(path))
    }

    /// `s3://bucket/object_key`, for error messages.
    fn location(&self, object_key: &str) -> String {
        format!("s3://{}/{object_key}", self.bucket_name)
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, AttemptError> {
        Arc::clone(&self.concurrency_limit)
            .acquire_owned()
            .await
            .map_err(|e| AttemptError::Permanent(anyhow::anyhow!("concurrency limiter: {e}")))
    }

    /// Uploads one buffered body with a single `PutObject`.
    async fn put_single(&self, key: &str, location: &str, bytes: Bytes) -> Result<(), RemoteStorageError> {
        retry("put", location, &self.retry_settings, || async {
            let _permit = self.permit().await?;
            self.client
                .put_object()
                .bucket(&self.bucket_name)
                .key(key)
                .content_length(bytes.len() as i64)
                .body(SdkByteStream::from(bytes.clone()))
                .send()
                .await
                .map_err(classify)?;
            Ok(())
        })
        .await
    }

    /// Streams `body` as a multipart upload; aborts the upload if anything fails, so no
    /// half-uploaded parts linger (and are billed) in the bucket.
    async fn put_multipart(
        &self,
        key: &str,
        location: &str,
        body: ByteStream,
        content_length_bytes: u64,
    ) -> Result<(), RemoteStorageError> {
        let created = retry("put (create multipart upload)", location, &self.retry_settings, || async {
            let _permit = self.permit().await?;
            self.client.create_multipart_upload().bucket(&self.bucket_name).key(key).send().await.map_err(classify)
        })
        .await?;
        let upload_id = created.upload_id().ok_or_else(|| {
            RemoteStorageError::permanent(
                "put (create multipart upload)",
                location,
                anyhow::anyhow!("response has no upload id"),
            )
        })?;

        let result = self.upload_parts(key, location, upload_id, body, content_length_bytes).await;
        if result.is_err() {
            let aborted = retry("put (abort multipart upload)", location, &self.retry_settings, || async {
                let _permit = self.permit().await?;
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket_name)
                    .key(key)
                    .upload_id(upload_id)
                    .send()
                    .await
                    .map_err(classify)
            })
            .await;
            if let Err(e) = aborted {
                tracing::warn!("could not abort failed multipart upload {upload_id}: {e}");
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        key: &str,
        location: &str,
        upload_id: &str,
        body: ByteStream,
        content_length_bytes: u64,
    ) -> Result<(), RemoteStorageError> {
        let body_error = |e: io::Error| RemoteStorageError::permanent("put", location, e);
        let mut reader = BodyReader::new(body);
        let mut parts = Vec::new();
        let mut uploaded_bytes = 0u64;
        while uploaded_bytes < content_length_bytes {
            let part_len = (content_length_bytes - uploaded_bytes).min(self.upload_part_size_bytes as u64) as usize;
            let part = reader.read_exact(part_len, content_length_bytes).await.map_err(body_error)?;
            let part_number = parts.len() as i32 + 1;
            let uploaded = retry("put (upload part)", location, &self.retry_settings, || async {
                let _permit = self.permit().await?;
                self.client
                    .upload_part()
                    .bucket(&self.bucket_name)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(part_number)
                    .content_length(part.len() as i64)
                    .body(SdkByteStream::from(part.clone()))
                    .send()
                    .await
                    .map_err(classify)
            })
            .await?;
            parts.push(
                CompletedPart::builder()
                    .set_e_tag(uploaded.e_tag().map(str::to_owned))
                    .part_number(part_number)
                    .build(),
            );
            uploaded_bytes += part_len as u64;
        }
        reader.expect_end(content_length_bytes).await.map_err(body_error)?;

        let completed = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        retry("put (complete multipart upload)", location, &self.retry_settings, || async {
            let _permit = self.permit().await?;
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket_name)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(completed.clone())
                .send()
                .await
                .map_err(classify)
        })
        .await?;
        Ok(())
    }

    /// A zero-length download of an existing object: what a range at or past the end reads.
    async fn empty_download(&self, key: &str, location: &str) -> Result<Download, RemoteStorageError> {
        let head = retry("get", location, &self.retry_settings, || async {
            let _permit = self.permit().await?;
            self.client.head_object().bucket(&self.bucket_name).key(key).send().await.map_err(classify)
        })
        .await?;
        Ok(Download {
            body: crate::byte_stream_from_bytes(Bytes::new()),
            content_length_bytes: 0,
            object_size_bytes: head.content_length().unwrap_or(0).max(0) as u64,
        })
    }
}

/// Sorts an SDK error into retryable or not, by HTTP status and S3 error code.
fn classify<E>(err: SdkError<E, HttpResponse>) -> AttemptError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &err {
        SdkError::ConstructionFailure(_) => false,
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => true,
        SdkError::DispatchFailure(failure) => !failure.is_user(),
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let code = service.err().code();
            if code == Some("NoSuchBucket") {
                false
            } else if status == 404 || matches!(code, Some("NoSuchKey" | "NotFound")) {
                return AttemptError::NotFound;
            } else {
                status >= 500
                    || status == 429
                    || matches!(
                        code,
                        Some(
                            "SlowDown"
                                | "Throttling"
                                | "ThrottlingException"
                                | "RequestTimeout"
                                | "RequestTimeTooSkewed"
                                | "InternalError"
                                | "ServiceUnavailable"
                        )
                    )
            }
        }
        _ => true,
    };
    let error = anyhow::anyhow!("{}", DisplayErrorContext(&err));
    if transient {
        AttemptError::Transient(error)
    } else {
        AttemptError::Permanent(error)
    }
}

/// Whether S3 refused a ranged GET because the range starts at or past the end of the object.
fn is_invalid_range<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    match err {
        SdkError::ServiceError(service) => {
            service.raw().status().as_u16() == 416 || service.err().code() == Some("InvalidRange")
        }
        _ => false,
    }
}

/// Total object size from a `Content-Range: bytes 0-9/100` header.
fn object_size_from_content_range(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.trim().parse().ok()
}

/// Percent-encodes a `CopySource` (`bucket/key`): everything but unreserved characters and `/`.
fn encode_copy_source(source: &str) -> String {
    let mut encoded = String::with_capacity(source.len());
    for byte in source.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~/".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Cuts an upload stream into exact-size buffers, checking it against the declared length.
struct BodyReader {
    body: ByteStream,
    pending: Bytes,
    read_bytes: u64,
}

impl BodyReader {
    fn new(body: ByteStream) -> Self {
        Self { body, pending: Bytes::new(), read_bytes: 0 }
    }

    /// Reads exactly `len` bytes; a body ending early is an error.
    async fn read_exact(&mut self, len: usize, declared_bytes: u64) -> io::Result<Bytes> {
        let mut buf = BytesMut::with_capacity(len);
        while buf.len() < len {
            if self.pending.is_empty() {
                match self.body.next().await {
                    Some(chunk) => self.pending = chunk?,
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "body ended after {} bytes, but {declared_bytes} were declared",
                                self.read_bytes + buf.len() as u64
                            ),
                        ))
                    }
                }
                continue;
            }
            let take = (len - buf.len()).min(self.pending.len());
            buf.extend_from_slice(&self.pending.split_to(take));
        }
        self.read_bytes += len as u64;
        Ok(buf.freeze())
    }

    /// Fails if the body holds more than was read so far.
    async fn expect_end(&mut self, declared_bytes: u64) -> io::Result<()> {
        loop {
            if !self.pending.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("body is longer than the declared {declared_bytes} bytes"),
                ));
            }
            match self.body.next().await {
                Some(chunk) => self.pending = chunk?,
                None => return Ok(()),
            }
        }
    }
}

#[async_trait]
impl RemoteStorage for S3Bucket {
    async fn put(
        &self,
        path: &RemotePath,
        body: ByteStream,
        content_length_bytes: u64,
    ) -> Result<(), RemoteStorageError> {
        let key = self.object_key(path);
        let location = self.location(&key);
        if content_length_bytes <= self.upload_part_size_bytes as u64 {
            let mut reader = BodyReader::new(body);
            let read = async {
                let bytes = reader.read_exact(content_length_bytes as usize, content_length_bytes).await?;
                reader.expect_end(content_length_bytes).await?;
                Ok::<_, io::Error>(bytes)
            };
            let bytes = read.await.map_err(|e| RemoteStorageError::permanent("put", location.as_str(), e))?;
            self.put_single(&key, &location, bytes).await
        } else {
            self.put_multipart(&key, &location, body, content_length_bytes).await
        }
    }

    async fn get(&self, path: &RemotePath, range: Option<(u64, Option<u64>)>) -> Result<Download, RemoteStorageError> {
        let key = self.object_key(path);
        let location = self.location(&key);
        let range_header = match range {
            None => None,
            Some((start, None)) => Some(format!("bytes={start}-")),
            Some((start, Some(end))) if end > start => Some(format!("bytes={start}-{}", end - 1)),
            Some(_) => return self.empty_download(&key, &location).await,
        };
        let response = retry("get", &location, &self.retry_settings, || async {
            let permit = self.permit().await?;
            match self
                .client
                .get_object()
                .bucket(&self.bucket_name)
                .key(&key)
                .set_range(range_header.clone())
                .send()
                .await
            {
                Ok(output) => Ok(Some((output, permit))),
                Err(e) if is_invalid_range(&e) => Ok(None),
                Err(e) => Err(classify(e)),
            }
        })
        .await?;
        let Some((output, permit)) = response else {
            return self.empty_download(&key, &location).await;
        };

        let content_length_bytes = output.content_length().unwrap_or(0).max(0) as u64;
        let object_size_bytes =
            output.content_range().and_then(object_size_from_content_range).unwrap_or(content_length_bytes);
        // The permit travels with the body: a download occupies a connection until it is read.
        let body =
            futures::stream::unfold((output.body, permit, location), |(mut body, permit, location)| async move {
                let item = body.next().await?;
                let item = item.map_err(|e| io::Error::other(format!("reading {location}: {e}")));
                Some((item, (body, permit, location)))
            });
        Ok(Download { body: Box::pin(body), content_length_bytes, object_size_bytes })
    }

    async fn list(
        &self,
        prefix: Option<&RemotePath>,
        mode: ListingMode,
        max_keys: Option<usize>,
    ) -> Result<Listing, RemoteStorageError> {
        if max_keys == Some(0) {
            return Ok(Listing::default());
        }
        let mut list_prefix = prefix.map(|p| p.as_str().to_owned()).unwrap_or_default();
        if mode == ListingMode::WithDelimiter && !list_prefix.is_empty() {
            list_prefix.push('/');
        }
        let bucket_prefix = match &self.prefix_in_bucket {
            Some(prefix) => format!("{prefix}/"),
            None => String::new(),
        };
        let full_prefix = format!("{bucket_prefix}{list_prefix}");
        let location = self.location(&full_prefix);
        let delimiter = (mode == ListingMode::WithDelimiter).then(|| "/".to_owned());
        let strip = |key: &str| key.strip_prefix(&bucket_prefix).map(str::to_owned);

        let mut raw_keys = Vec::new();
        let mut raw_prefixes = Vec::new();
        let mut continuation_token: Option<String> = None;
        loop {
            let listed_count = raw_keys.len() + raw_prefixes.len();
            let page_keys_max = match max_keys {
                Some(max_keys) if max_keys <= listed_count => break,
                Some(max_keys) => (max_keys - listed_count).min(LIST_PAGE_KEYS_MAX),
                None => LIST_PAGE_KEYS_MAX,
            };
            let page = retry("list", &location, &self.retry_settings, || async {
                let _permit = self.permit().await?;
                self.client
                    .list_objects_v2()
                    .bucket(&self.bucket_name)
                    .set_prefix((!full_prefix.is_empty()).then(|| full_prefix.clone()))
                    .set_delimiter(delimiter.clone())
                    .max_keys(page_keys_max as i32)
                    .set_continuation_token(continuation_token.clone())
                    .send()
                    .await
                    .map_err(classify)
            })
            .await?;
            raw_keys.extend(page.contents().iter().filter_map(|o| o.key().and_then(strip)));
            raw_prefixes.extend(page.common_prefixes().iter().filter_map(|p| p.prefix().and_then(strip)));
            continuation_token = page.next_continuation_token().map(str::to_owned);
            if !page.is_truncated().unwrap_or(false) || continuation_token.is_none() {
                break;
            }
        }
        Ok(finish_listing(raw_keys, raw_prefixes, &list_prefix, mode, max_keys))
    }

    async fn delete(&self, path: &RemotePath) -> Result<(), RemoteStorageError> {
        let key = self.object_key(path);
        let result = retry("delete", &self.location(&key), &self.retry_settings, || async {
            let _permit = self.permit().await?;
            self.client.delete_object().bucket(&self.bucket_name).key(&key).send().await.map_err(classify)
        })
        .await;
        match result {
            Ok(_) | Err(RemoteStorageError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete_many(&self, paths: &[RemotePath]) -> Result<(), RemoteStorageError> {
        let mut failures = Vec::new();
        for batch in paths.chunks(DELETE_BATCH_KEYS_MAX) {
            let keys: Vec<String> = batch.iter().map(|p| self.object_key(p)).collect();
            let batch_location = format!("{} (and {} more keys)", self.location(&keys[0]), keys.len() - 1);
            let build_error = |e| RemoteStorageError::permanent("delete_many", batch_location.as_str(), e);
            let objects = keys
                .iter()
                .map(|key| ObjectIdentifier::builder().key(key).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(build_error)?;
            let delete = Delete::builder().set_objects(Some(objects)).quiet(true).build().map_err(build_error)?;
            let output = retry("delete_many", &batch_location, &self.retry_settings, || async {
                let _permit = self.permit().await?;
                self.client
                    .delete_objects()
                    .bucket(&self.bucket_name)
                    .delete(delete.clone())
                    .send()
                    .await
                    .map_err(classify)
            })
            .await?;
            for error in output.errors() {
                if error.code() == Some("NoSuchKey") {
                    continue;
                }
                failures.push(DeleteFailure {
                    key: self.location(error.key().unwrap_or("<no key>")),
                    message: format!("{}: {}", error.code().unwrap_or("unknown error"), error.message().unwrap_or("")),
                });
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(RemoteStorageError::DeleteFailed {
                storage: self.location(self.prefix_in_bucket.as_deref().unwrap_or("")),
                failures,
            })
        }
    }

    async fn copy(&self, from: &RemotePath, to: &RemotePath) -> Result<(), RemoteStorageError> {
        let from_key = self.object_key(from);
        let to_key = self.object_key(to);
        let to_location = self.location(&to_key);
        let copy_source = encode_copy_source(&format!("{}/{from_key}", self.bucket_name));
        retry("copy", &self.location(&from_key), &self.retry_settings, || async {
            let _permit = self.permit().await?;
            self.client
                .copy_object()
                .bucket(&self.bucket_name)
                .copy_source(&copy_source)
                .key(&to_key)
                .send()
                .await
                .map_err(|e| match classify(e) {
                    AttemptError::Transient(e) => {
                        AttemptError::Transient(e.context(format!("copying to {to_location}")))
                    }
                    AttemptError::Permanent(e) => {
                        AttemptError::Permanent(e.context(format!("copying to {to_location}")))
                    }
                    AttemptError::NotFound => AttemptError::NotFound,
                })
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_gives_object_size() {
        assert_eq!(object_size_from_content_range("bytes 0-9/100"), Some(100));
        assert_eq!(object_size_from_content_range("bytes */0"), Some(0));
        assert_eq!(object_size_from_content_range("garbage"), None);
    }

    #[test]
    fn copy_source_is_percent_encoded() {
        assert_eq!(encode_copy_source("b/a b/ü+x"), "b/a%20b/%C3%BC%2Bx");
        assert_eq!(encode_copy_source("b/t-1/x_y.z~"), "b/t-1/x_y.z~");
    }

    #[tokio::test]
    async fn body_reader_checks_declared_length() {
        let chunks =
            || -> ByteStream { Box::pin(futures::stream::iter(["abc", "de", "", "fgh"].map(|s| Ok(Bytes::from(s))))) };
        let mut reader = BodyReader::new(chunks());
        assert_eq!(reader.read_exact(4, 8).await.unwrap(), "abcd");
        assert_eq!(reader.read_exact(4, 8).await.unwrap(), "efgh");
        reader.expect_end(8).await.unwrap();

        let mut reader = BodyReader::new(chunks());
        let err = reader.read_exact(9, 9).await.unwrap_err();
        assert!(err.to_string().contains("ended after 8 bytes"), "{err}");

        let mut reader = BodyReader::new(chunks());
        reader.read_exact(7, 7).await.unwrap();
        assert!(reader.expect_end(7).await.is_err());
    }
}
