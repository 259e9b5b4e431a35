"""mrc-ingest: an ingestion service for cryo-EM MRC/MRCZ movies."""

__version__ = "0.1.0"
