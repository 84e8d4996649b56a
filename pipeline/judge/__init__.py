"""Judge (RLAIF): the pure prompt and parse, the OpenAI-compatible client, rubrics, and the stage."""
