"""Wire formats: OpenAI requests, responses, stream chunks and errors."""
