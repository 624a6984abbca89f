"""`make demo`'s own parts: the drawn world (world), the base model trained on it (model, build:
`prefpipe demo-model`) and the verdict read from the eval reports (headline: `prefpipe demo-headline`)."""
