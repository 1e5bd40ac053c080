"""Data: sources, prepare (class split -> webdataset shards), degradation masks, datamodule."""
