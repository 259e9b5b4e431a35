"""tus 1.0 resumable uploads, split as tusd splits them: the protocol handler
(:mod:`.handler`), where the bytes wait (:mod:`.stores`: a local file or S3 multipart
parts), and the per-upload lock (:mod:`.locker`)."""

from .handler import (CHECKSUMS, EXTENSIONS, VERSION, TusArrived, TusUploads,
                      WrongContentType, check_version)

__all__ = ["CHECKSUMS", "EXTENSIONS", "VERSION", "TusArrived", "TusUploads",
           "WrongContentType", "check_version"]
