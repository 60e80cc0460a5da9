"""`lmjobs finetune`: SFT, classification, token classification and extractive QA on the shared loop."""
