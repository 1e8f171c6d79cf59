"""The knowledge bases: the Milvus store and the one write path every importer uses."""
