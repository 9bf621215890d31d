"""tuneserve fine-tuning stage: adapt a pre-trained backbone to a small labelled data set.

python -m finetune DATA --backbone NAME --strategy STRATEGY --out runs/NAME
"""
