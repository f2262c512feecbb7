"""`python -m peft_pipeline` and `accelerate launch -m peft_pipeline` enter here."""

from peft_pipeline.cli import main

raise SystemExit(main())
