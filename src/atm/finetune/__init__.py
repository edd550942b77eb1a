"""atm.finetune"""
