"""A question's trip without transport: request types, validation, retrieval, ranking, answers."""
