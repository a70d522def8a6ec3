By_finalJF(
?Pž÷Àrwm@)Nô?ó&Á§x@